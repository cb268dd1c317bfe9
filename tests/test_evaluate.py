"""Evaluation on crafted CAMs over real shards: exact confusion counts, the sweep, completeness errors,
and the same result for 1, 2 and 3 processes."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, launch_cmd, run_vwe
from vwe.formats.cams import CamRecord, read_cam, write_cam
from vwe.formats.config import load_config
from vwe.runtime.errors import DataError
from vwe.data.loader import infer_samples

DEMO = str(REPO / "configs" / "demo.yaml")


def overrides(shards: Path, run: Path, *extra: str) -> list[str]:
    return [f"data.root={shards}", f"output.run_dir={run}", "data.num_workers=0", *extra]


def ground_truth(shards: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    cfg = load_config(DEMO, overrides(shards, Path("unused")))
    out = {}
    for s in infer_samples(cfg.data, cfg.infer, 0, 1, with_scales=False):
        out[s["key"]] = (s["mask"].numpy(), np.flatnonzero(s["labels"].numpy() > 0.5))
    return out


def final_weights(run: Path, value: float = 0.0) -> str:
    """A (tiny) weights file where `vwe infer` looks for the run's final weights; returns its SHA-256."""
    import torch
    from vwe.formats.checkpoint import FINAL_WEIGHTS_NAME, export_weights
    return export_weights({"w": torch.full((2,), value)}, {}, run / FINAL_WEIGHTS_NAME)


def write_cams(run: Path, gt: dict, score, checkpoint: str | None = None) -> str:
    """score(mask, class_index) -> high_res map for that class. CAMs of the run's final weights (written
    here) unless `checkpoint` names another hash; returns the hash stored."""
    checkpoint = checkpoint or final_weights(run)
    for key, (mask, keys) in gt.items():
        high = np.stack([score(mask, k) for k in keys]).astype(np.float32) if len(keys) else \
            np.zeros((0, *mask.shape), np.float32)
        h, w = mask.shape
        strided = high[:, ::4, ::4][:, : -(-h // 4), : -(-w // 4)]
        write_cam(run / "cams" / f"{key}.npz", CamRecord(keys, strided, high, checkpoint))
    return checkpoint


@pytest.fixture(scope="module")
def gt(synthetic_shards):
    return ground_truth(synthetic_shards)


def report(run: Path) -> dict:
    return json.loads((run / "eval" / "report.json").read_text())


def test_perfect_cams_score_one(synthetic_shards, gt, tmp_path):
    write_cams(tmp_path, gt, lambda m, k: np.where(m == k + 1, 0.9, 0.1))
    proc = run_vwe("evaluate", "--config", DEMO, *overrides(synthetic_shards, tmp_path, "eval.bkg=0.5"))
    r = report(tmp_path)
    assert r["miou"] == pytest.approx(1.0) and r["num_images"] == len(gt) and r["weights_matched"]
    assert r["weights_sha256"] == final_weights(tmp_path) and r["skipped"]["count"] == 0
    assert "| bkg | aero |" in proc.stdout and (tmp_path / "eval" / "table.md").is_file()


def test_confusion_matches_direct_count(synthetic_shards, gt, tmp_path):
    # every pixel goes to the image's first class, whatever the ground truth
    write_cams(tmp_path, gt, lambda m, k: np.full(m.shape, 0.8))
    run_vwe("evaluate", "--config", DEMO, *overrides(synthetic_shards, tmp_path, "eval.bkg=0.5"))
    expected = np.zeros((21, 21), np.int64)
    for mask, keys in gt.values():
        valid = mask != 255
        pred = keys[0] + 1 if len(keys) else 0
        for g in np.unique(mask[valid]):
            expected[g, pred] += int(((mask == g) & valid).sum())
    assert (np.array(report(tmp_path)["confusion"]) == expected).all()


def test_sweep_finds_the_separating_threshold(synthetic_shards, gt, tmp_path):
    write_cams(tmp_path, gt, lambda m, k: np.where(m == k + 1, 0.45, 0.25))
    proc = run_vwe("evaluate", "--config", DEMO, "--sweep", *overrides(synthetic_shards, tmp_path, "eval.bkg=0.6"))
    r = report(tmp_path)
    assert 0.25 <= r["sweep"]["best_bkg"] < 0.45 and r["sweep"]["best_miou"] == pytest.approx(1.0)
    assert r["miou"] < 0.5  # at bkg 0.6 everything is background
    assert "sweep: best bkg=" in proc.stdout


def test_missing_cams_listed_unless_allowed(synthetic_shards, gt, tmp_path):
    write_cams(tmp_path, gt, lambda m, k: np.where(m == k + 1, 0.9, 0.1))
    gone = sorted(gt)[:2]
    for key in gone:
        (tmp_path / "cams" / f"{key}.npz").unlink()
    proc = run_vwe("evaluate", "--config", DEMO, *overrides(synthetic_shards, tmp_path), check=False)
    assert proc.returncode == 2 and "2 id(s)" in proc.stderr and all(k in proc.stderr for k in gone)
    run_vwe("evaluate", "--config", DEMO, *overrides(synthetic_shards, tmp_path, "eval.allow_missing=true"))
    assert report(tmp_path)["missing"] == gone and report(tmp_path)["num_images"] == len(gt) - 2


def test_corrupt_and_wrong_shape_cams_are_named(synthetic_shards, gt, tmp_path):
    write_cams(tmp_path, gt, lambda m, k: np.where(m == k + 1, 0.9, 0.1))
    first, second = sorted(gt)[:2]
    (tmp_path / "cams" / f"{first}.npz").write_bytes(b"not a zip file")
    rec = read_cam(tmp_path / "cams" / f"{second}.npz")
    small = rec.high_res[:, :-2, :]
    write_cam(tmp_path / "cams" / f"{second}.npz",
              CamRecord(rec.keys, small[:, ::4, ::4][:, : -(-small.shape[1] // 4)], small, rec.weights_sha256))
    proc = run_vwe("evaluate", "--config", DEMO, *overrides(synthetic_shards, tmp_path), check=False)
    assert proc.returncode == 2
    assert f"{first}.npz: unreadable" in proc.stderr
    assert f"{second}.npz: size" in proc.stderr and "differs from its mask" in proc.stderr


def test_readers_of_high_res_alone_skip_the_strided_cam(tmp_path):
    """read_cam(strided=False) (evaluation, CAM labels) neither reads nor checks `cam`; the full read does."""
    high = np.full((1, 8, 12), 0.5, np.float32)
    write_cam(tmp_path / "a.npz", CamRecord(np.array([4]), np.full((1, 2, 3), np.nan, np.float32), high, "w"))
    rec = read_cam(tmp_path / "a.npz", strided=False)
    assert rec.cam is None and rec.keys.tolist() == [4] and np.array_equal(rec.high_res, high)
    with pytest.raises(DataError, match="non-finite value"):
        read_cam(tmp_path / "a.npz")
    bad = np.full((2, 8, 12), np.inf, np.float32)  # what it still checks: high_res
    write_cam(tmp_path / "b.npz", CamRecord(np.array([4, 5]), np.zeros((2, 2, 3), np.float32), bad, "w"))
    with pytest.raises(DataError, match="b.npz: 192 non-finite value"):
        read_cam(tmp_path / "b.npz", strided=False)


def test_cams_from_two_checkpoints_are_refused(synthetic_shards, gt, tmp_path):
    write_cams(tmp_path, gt, lambda m, k: np.where(m == k + 1, 0.9, 0.1))
    stale = sorted(gt)[3]
    rec = read_cam(tmp_path / "cams" / f"{stale}.npz")
    write_cam(tmp_path / "cams" / f"{stale}.npz", CamRecord(rec.keys, rec.cam, rec.high_res, "other"))
    proc = run_vwe("evaluate", "--config", DEMO, *overrides(synthetic_shards, tmp_path), check=False)
    assert proc.returncode == 2 and "2 different weights files" in proc.stderr and stale in proc.stderr
    assert "rerun `vwe infer`" in proc.stderr


@pytest.mark.multiprocess
@pytest.mark.parametrize("processes", [2, 3])
def test_same_report_over_processes(synthetic_shards, gt, tmp_path, processes):
    rng = np.random.default_rng(1)
    write_cams(tmp_path, gt, lambda m, k: rng.random(m.shape))
    run_vwe("evaluate", "--config", DEMO, "--sweep", *overrides(synthetic_shards, tmp_path))
    single = report(tmp_path)
    cmd = launch_cmd(processes, "evaluate", "--config", DEMO, "--sweep", *overrides(synthetic_shards, tmp_path))
    proc = subprocess.run(cmd, cwd=REPO, text=True, capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    multi = report(tmp_path)
    assert multi["processes"] == processes
    assert multi["confusion"] == single["confusion"] and multi["sweep"]["miou"] == single["sweep"]["miou"]


def test_same_report_for_any_thread_count(synthetic_shards, gt, tmp_path):
    """eval.num_workers changes how many threads read and count, never the counts or the lists."""
    rng = np.random.default_rng(2)
    write_cams(tmp_path, gt, lambda m, k: rng.random(m.shape))
    gone = sorted(gt)[3:5]
    for key in gone:
        (tmp_path / "cams" / f"{key}.npz").unlink()
    reports = []
    for threads in (1, 3):
        run_vwe("evaluate", "--config", DEMO, "--sweep",
                *overrides(synthetic_shards, tmp_path, "eval.allow_missing=true", f"eval.num_workers={threads}"))
        reports.append(report(tmp_path))
    one, three = reports
    assert one["threads_per_process"] == 1 and three["threads_per_process"] == 3
    assert one["confusion"] == three["confusion"] and one["sweep"] == three["sweep"]
    assert one["missing"] == three["missing"] == gone and one["num_images"] == three["num_images"] == len(gt) - 2


def test_cams_of_other_weights_are_refused_unless_named(synthetic_shards, gt, tmp_path):
    old = write_cams(tmp_path, gt, lambda m, k: np.where(m == k + 1, 0.9, 0.1))
    new = final_weights(tmp_path, value=1.0)  # "more training": the run's final weights changed
    assert new != old
    proc = run_vwe("evaluate", "--config", DEMO, *overrides(synthetic_shards, tmp_path), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert old in proc.stderr and new in proc.stderr and "final/model.safetensors" in proc.stderr
    assert "Rerun `vwe infer`" in proc.stderr and f"eval.cams={tmp_path / 'cams'}" in proc.stderr
    assert not (tmp_path / "eval" / "report.json").exists()
    # named explicitly: scored as it is, and the report says it was not matched to weights
    proc = run_vwe("evaluate", "--config", DEMO,
                   *overrides(synthetic_shards, tmp_path, f"eval.cams={tmp_path / 'cams'}", "eval.bkg=0.5"))
    r = report(tmp_path)
    assert r["miou"] == pytest.approx(1.0) and r["weights_sha256"] == old and r["weights_matched"] is False
    assert r["weights"] is None and r["cams"] == str(tmp_path / "cams")
    assert "scored as they are (eval.cams)" in proc.stdout


def test_no_weights_to_match_names_the_file_and_the_option(synthetic_shards, gt, tmp_path):
    write_cams(tmp_path, gt, lambda m, k: np.where(m == k + 1, 0.9, 0.1), checkpoint="copied")
    proc = run_vwe("evaluate", "--config", DEMO, *overrides(synthetic_shards, tmp_path), check=False)
    assert proc.returncode == 2 and str(tmp_path / "final" / "model.safetensors") in proc.stderr
    assert "eval.cams=<folder>" in proc.stderr and "Traceback" not in proc.stderr
    run_vwe("evaluate", "--config", DEMO, *overrides(synthetic_shards, tmp_path, f"eval.cams={tmp_path / 'cams'}"))
    assert report(tmp_path)["weights_sha256"] == "copied"


@pytest.mark.parametrize("case", ["nan", "inf", "key_out_of_range", "key_twice"])
def test_bad_cam_contents_name_the_file(synthetic_shards, gt, tmp_path, case):
    write_cams(tmp_path, gt, lambda m, k: np.where(m == k + 1, 0.9, 0.1))
    key = next(k for k in sorted(gt) if len(gt[k][1]))
    path = tmp_path / "cams" / f"{key}.npz"
    rec = read_cam(path)
    high, keys = rec.high_res.copy(), rec.keys.copy()
    if case in ("nan", "inf"):
        high[0, 1, 2] = np.nan if case == "nan" else np.inf
        expected = "non-finite value(s) in 'high_res'"
    elif case == "key_out_of_range":
        keys[0] = 20
        expected = "class index out of range 0..19"
    else:
        keys, high = np.array([keys[0], keys[0]]), np.concatenate([high[:1], high[:1]])
        expected = "a class index appears twice"
    h, w = high.shape[1:]
    np.savez(path, keys=keys, cam=high[:, ::4, ::4][:, : -(-h // 4), : -(-w // 4)], high_res=high,
             weights_sha256=np.array(rec.weights_sha256))
    proc = run_vwe("evaluate", "--config", DEMO, *overrides(synthetic_shards, tmp_path), check=False)
    assert proc.returncode == 2 and f"CAM file {path}: " in proc.stderr and expected in proc.stderr
    assert "Traceback" not in proc.stderr


def test_older_cam_files_with_checkpoint_field_still_read(tmp_path):
    path = tmp_path / "old.npz"
    np.savez(path, keys=np.array([3]), cam=np.zeros((1, 2, 2), np.float16), high_res=np.zeros((1, 5, 8), np.float16),
             checkpoint=np.array("deadbeef"))
    rec = read_cam(path)
    assert rec.weights_sha256 == "deadbeef" and rec.keys.tolist() == [3]


@pytest.fixture(scope="module")
def bad_split(synthetic_shards, tmp_path_factory):
    """The val split again, with a mask holding value 30 in one sample and a garbage JPEG in another."""
    from data_helpers import samples_of, write_split
    from vwe.data.voc import decode_mask, encode_mask
    samples = samples_of(synthetic_shards, "val")
    bad_mask, bad_jpeg = samples[2]["key"], samples[7]["key"]
    mask = decode_mask(samples[2]["parts"]["mask.png"], "test").copy()
    mask[:3, :3] = 30
    samples[2]["parts"]["mask.png"] = encode_mask(mask)
    samples[7]["parts"]["jpg"] = b"not a jpeg" * 10
    root = tmp_path_factory.mktemp("bad_split")
    write_split(root, "val", samples[:7], 1)  # only the bad mask
    write_split(root / "both", "val", samples, 2)
    return root, bad_mask, bad_jpeg, samples


def test_mask_value_outside_classes_names_shard_and_key(bad_split, gt, tmp_path):
    root, bad_mask, _, _ = bad_split
    write_cams(tmp_path, {k: v for k, v in gt.items() if k != bad_mask} | {bad_mask: gt[bad_mask]},
               lambda m, k: np.where(m == k + 1, 0.9, 0.1))
    proc = run_vwe("evaluate", "--config", DEMO, *overrides(root, tmp_path), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert f"shard val-000000.tar, sample '{bad_mask}': mask holds value(s) 30 (9 pixels) outside 0..20 and 255" \
        in proc.stderr
    # visualize reads the same mask
    proc = run_vwe("visualize", "--config", DEMO, *overrides(root, tmp_path), "--ids", bad_mask,
                   "--out", str(tmp_path / "p.png"), check=False)
    assert proc.returncode == 2 and f"sample '{bad_mask}': mask holds value(s) 30" in proc.stderr
    assert not (tmp_path / "p.png").exists()


def test_skipped_samples_are_listed_in_the_report(bad_split, gt, tmp_path):
    root, bad_mask, bad_jpeg, samples = bad_split
    both = root / "both"
    write_cams(tmp_path, {s["key"]: gt[s["key"]] for s in samples}, lambda m, k: np.where(m == k + 1, 0.9, 0.1))
    proc = run_vwe("evaluate", "--config", DEMO, *overrides(both, tmp_path), check=False)
    assert proc.returncode == 2 and f"sample '{bad_jpeg}'" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_vwe("evaluate", "--config", DEMO, *overrides(both, tmp_path, "data.on_corrupt=skip", "eval.bkg=0.5"))
    r = report(tmp_path)
    n = len(samples)
    assert r["num_images"] == n - 2 and r["split_size"] == n and r["miou"] == pytest.approx(1.0)
    assert r["skipped"]["count"] == 2
    assert r["skipped"]["by_reason"] == {"corrupt": [bad_jpeg], "mask values": [bad_mask]}
    assert "holds value(s) 30" in r["skipped"]["messages"][bad_mask]
    assert f"({n - 2} of {n} images: 2 skipped as corrupt (data.on_corrupt=skip, ids in report.json)" in proc.stdout
