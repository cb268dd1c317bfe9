"""`vwe refine`: pseudo-label PNGs from CAM folders (threshold and DenseCRF), their mIoU, resume, bad input,
and the same PNGs from 1 and 2 processes. CAMs are written for the synthetic masks, so the threshold
variant's labels and mIoU are known exactly."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from conftest import REPO, launch_cmd, run_vwe
from data_helpers import demo_cfg
from vwe.formats.cams import CamRecord, write_cam
from vwe.data.loader import infer_samples
from vwe.formats.labels import voc_palette

try:
    import pydensecrf.densecrf  # noqa: F401
    HAVE_CRF = True
except ImportError:
    HAVE_CRF = False
needs_crf = pytest.mark.skipif(not HAVE_CRF, reason="the crf extra (pydensecrf2) is not installed")

DEMO = REPO / "configs" / "demo.yaml"
BLANK_ROWS = 3  # the known error of the exact CAMs: the top rows get no class evidence -> background


def _samples(shards: Path) -> list[dict]:
    return list(infer_samples((cfg := demo_cfg(shards, "data.infer_split=train")).data, cfg.infer, 0, 1,
                              with_scales=False))


def _exact_cam(mask: np.ndarray) -> CamRecord:
    keys = np.array(sorted({int(v) - 1 for v in np.unique(mask) if 0 < v <= 20}), dtype=np.int64)
    high = np.stack([(mask == k + 1).astype(np.float32) * 0.8 for k in keys]) if len(keys) else \
        np.zeros((0, *mask.shape), np.float32)
    high[:, :BLANK_ROWS] = 0.0
    return _record(keys, high)


def _blurred_cam(mask: np.ndarray) -> CamRecord:
    """Class evidence blurred over the object borders and shifted by 2 px: what a CAM looks like."""
    keys = np.array(sorted({int(v) - 1 for v in np.unique(mask) if 0 < v <= 20}), dtype=np.int64)
    chans = [ndimage.shift(ndimage.gaussian_filter((mask == k + 1).astype(np.float32), 3.0), (2, 2), order=1)
             for k in keys]
    high = np.stack([c / max(c.max(), 1e-6) for c in chans]) if chans else np.zeros((0, *mask.shape), np.float32)
    return _record(keys, high)


def _record(keys: np.ndarray, high: np.ndarray) -> CamRecord:
    h, w = high.shape[1:]
    strided = high[:, ::4, ::4]
    assert strided.shape[1:] == (-(-h // 4), -(-w // 4))
    return CamRecord(keys, np.ascontiguousarray(strided), high, "synthetic-cams")


def _write_cams(samples: list[dict], out: Path, make) -> Path:
    for s in samples:
        write_cam(out / f"{s['key']}.npz", make(s["mask"].numpy()))
    return out


def _args(shards: Path, cams: Path, labels: Path, *extra: str) -> list[str]:
    return ["--config", str(DEMO), f"data.root={shards}", "data.infer_split=train", "data.num_workers=0",
            "infer.num_workers=0", f"refine.cam_dir={cams}", f"refine.out_dir={labels}", *extra]


def _miou_by_hand(pairs: list[tuple[np.ndarray, np.ndarray]]) -> float:
    """Mean IoU over classes present in the ground truth, 255 ignored, counted pixel by pixel."""
    inter, pred_n, gt_n = np.zeros(21), np.zeros(21), np.zeros(21)
    for pred, gt in pairs:
        valid = gt != 255
        for c in range(21):
            p, g = (pred == c) & valid, (gt == c) & valid
            inter[c] += (p & g).sum()
            pred_n[c] += p.sum()
            gt_n[c] += g.sum()
    present = gt_n > 0
    return float(np.mean(inter[present] / (pred_n + gt_n - inter)[present]))


@pytest.fixture(scope="module")
def samples(synthetic_shards):
    return _samples(synthetic_shards)


def test_threshold_labels_and_miou_are_exact(synthetic_shards, samples, tmp_path):
    cams = _write_cams(samples, tmp_path / "cams", _exact_cam)
    labels = tmp_path / "labels"
    proc = run_vwe("refine", *_args(synthetic_shards, cams, labels, "refine.method=threshold", "refine.bkg=0.3"))
    expected = {}
    for s in samples:
        mask = s["mask"].numpy()
        e = np.where(mask == 255, 0, mask).astype(np.uint8)
        e[:BLANK_ROWS] = 0
        expected[s["key"]] = (e, mask)
    assert sorted(p.stem for p in labels.glob("*.png")) == sorted(expected)
    for key, (e, _) in expected.items():
        with Image.open(labels / f"{key}.png") as im:
            assert im.mode == "L"
            np.testing.assert_array_equal(np.asarray(im), e)
        with Image.open(labels / "color" / f"{key}.png") as im:  # same index values, VOC colours
            assert im.mode == "P" and im.getpalette()[:63] == voc_palette()[:63]
            np.testing.assert_array_equal(np.asarray(im), e)
    report = json.loads((labels / "report.json").read_text())
    want = _miou_by_hand(list(expected.values()))
    assert want < 0.99  # the blank rows are a real error, so the check below can fail
    assert report["miou"] == pytest.approx(want, abs=1e-12)
    assert report["num_images"] == report["scored"] == report["written"] == len(samples) == 48
    assert report["settings"] == {"method": "threshold", "bkg": 0.3}
    assert f"{100 * want:.1f} |" in (labels / "report.md").read_text() and f"{100 * want:.1f}" in proc.stdout


@needs_crf
def test_crf_improves_blurred_cams(synthetic_shards, samples, tmp_path):
    cams = _write_cams(samples, tmp_path / "cams", _blurred_cam)
    labels = tmp_path / "labels"
    run_vwe("refine", *_args(synthetic_shards, cams, labels, "refine.color=false"))
    report = json.loads((labels / "report.json").read_text())
    assert report["settings"]["method"] == "crf" and report["settings"]["iterations"] == 10
    assert not (labels / "color").exists()
    for s in samples:
        with Image.open(labels / f"{s['key']}.png") as im:
            lab = np.asarray(im)
        allowed = {0} | {int(v) for v in np.unique(s["mask"].numpy()) if 0 < v <= 20}
        assert lab.shape == tuple(s["size"]) and set(np.unique(lab).tolist()) <= allowed
    print(f"blurred CAMs: threshold mIoU {report['threshold']['miou']:.4f} -> CRF {report['miou']:.4f}")
    assert report["miou"] > report["threshold"]["miou"] + 0.01


def test_resume_skips_done_and_redoes_stale(synthetic_shards, samples, tmp_path):
    cams = _write_cams(samples, tmp_path / "cams", _blurred_cam)
    labels = tmp_path / "labels"
    args = _args(synthetic_shards, cams, labels, "refine.method=threshold")
    run_vwe("refine", *args)
    first = json.loads((labels / "report.json").read_text())
    gone = [samples[0]["key"], samples[5]["key"]]
    for key in gone:
        (labels / f"{key}.png").unlink()
    (labels / "color" / f"{samples[7]['key']}.png").unlink()  # a colour copy missing: redone too
    write_cam(cams / f"{samples[9]['key']}.npz", _exact_cam(samples[9]["mask"].numpy()))  # changed CAM
    mtimes = {p.name: p.stat().st_mtime_ns for p in labels.glob("*.png")}
    run_vwe("refine", *args)
    manifest = json.loads((labels / "manifest-rank000.json").read_text())
    assert manifest["written"] == 4 and manifest["already_done"] == 44 and manifest["stale_replaced"] == 2
    redone = {samples[i]["key"] for i in (0, 5, 7, 9)}
    assert set(manifest["ids"]) == redone
    assert all((labels / n).stat().st_mtime_ns == t for n, t in mtimes.items() if Path(n).stem not in redone)
    second = json.loads((labels / "report.json").read_text())
    assert second["num_images"] == 48 and second["miou"] != first["miou"]  # sample 9 now has better CAMs
    run_vwe("refine", *args, "refine.bkg=0.2")  # other settings: every label is redone
    assert json.loads((labels / "manifest-rank000.json").read_text())["stale_replaced"] == 48


def test_bad_cams_exit_2_naming_the_file(synthetic_shards, samples, tmp_path):
    cams = _write_cams(samples, tmp_path / "cams", _exact_cam)
    labels = tmp_path / "labels"
    missing = cams / f"{samples[3]['key']}.npz"
    missing.unlink()
    rec = _exact_cam(samples[4]["mask"].numpy())
    write_cam(cams / f"{samples[4]['key']}.npz", _record(rec.keys, rec.high_res[:, :-1]))
    proc = run_vwe("refine", *_args(synthetic_shards, cams, labels, "refine.method=threshold"), check=False)
    assert proc.returncode == 2, proc.stderr
    assert "2 CAM problem(s)" in proc.stderr and f"CAM file {missing}: not found" in proc.stderr
    assert f"{samples[4]['key']}.npz: size" in proc.stderr and "differs from its image" in proc.stderr
    assert "Traceback" not in proc.stderr and not (labels / "report.json").exists()
    proc = run_vwe("refine", *_args(synthetic_shards, tmp_path / "nowhere", labels, "refine.method=threshold"),
                   check=False)
    assert proc.returncode == 2 and f"CAM folder {tmp_path / 'nowhere'} does not exist" in proc.stderr


def test_cams_of_two_weights_files_are_refused(synthetic_shards, samples, tmp_path):
    cams = _write_cams(samples, tmp_path / "cams", _exact_cam)
    stale = samples[2]["key"]
    rec = _exact_cam(samples[2]["mask"].numpy())
    write_cam(cams / f"{stale}.npz", CamRecord(rec.keys, rec.cam, rec.high_res, "older-weights"))
    labels = tmp_path / "labels"
    proc = run_vwe("refine", *_args(synthetic_shards, cams, labels, "refine.method=threshold"), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"CAMs in {cams} come from 2 different weights files" in proc.stderr
    assert f"weights older-weights: 1 CAMs, e.g. {stale}" in proc.stderr and "rerun `vwe infer`" in proc.stderr
    assert not (labels / "report.json").exists()


@needs_crf
@pytest.mark.multiprocess
def test_two_processes_write_the_same_pngs(synthetic_shards, samples, tmp_path):
    cams = _write_cams(samples, tmp_path / "cams", _blurred_cam)
    outputs = {}
    for n in (1, 2):
        labels = tmp_path / f"labels{n}"
        proc = subprocess.run(launch_cmd(n, "refine", *_args(synthetic_shards, cams, labels)), text=True,
                              capture_output=True, timeout=600)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        outputs[n] = {p.relative_to(labels): p.read_bytes() for p in labels.rglob("*.png")}
        report = json.loads((labels / "report.json").read_text())
        assert report["processes"] == n and report["num_images"] == 48
        outputs[f"miou{n}"] = report["miou"]
    assert len(outputs[1]) == 96 and outputs[1] == outputs[2]
    assert outputs["miou1"] == outputs["miou2"]
    manifests = sorted((tmp_path / "labels2").glob("manifest-rank*.json"))
    ids = [set(json.loads(m.read_text())["ids"]) for m in manifests]
    assert len(ids) == 2 and not ids[0] & ids[1] and len(ids[0] | ids[1]) == 48


@needs_crf
def test_crf_labels_function():
    from vwe.formats.config import RefineConfig
    from vwe.stages.refine import crf_labels, crf_probabilities, threshold_labels
    rng = np.random.default_rng(0)
    high = rng.random((2, 30, 41)).astype(np.float16)
    p = crf_probabilities(high, 0.15)
    assert p.shape == (3, 30, 41) and p.dtype == np.float32
    np.testing.assert_allclose(p.sum(axis=0), 1.0, rtol=1e-6)
    image = np.zeros((30, 41, 3), np.uint8)
    image[:, 20:] = 200  # two flat regions: the CRF labels follow the colour edge
    image.flags.writeable = False  # decoded images may be read-only views
    high = np.zeros((2, 30, 41), np.float32)
    high[0, :, :18] = 0.9  # class evidence ending 2 px short of the edge
    high[1, :, 22:] = 0.9  # and starting 2 px after it
    label = crf_labels(image, high, np.array([3, 11]), RefineConfig())
    assert label.dtype == np.uint8 and set(np.unique(label).tolist()) <= {0, 4, 12}
    assert (label[:, :20] == 4).all() and (label[:, 20:] == 12).all()  # the gap goes to the colour edge
    assert (threshold_labels(high, np.array([3, 11]), 0.15)[:, 18:22] == 0).all()  # without the CRF: background
    assert crf_labels(image, high[:0], np.array([], np.int64), RefineConfig()).max() == 0
    with pytest.raises(ValueError, match="does not match"):
        crf_labels(image[:, :40], high, np.array([3, 11]), RefineConfig())
