"""The IRNet stage with real processes on tiny synthetic data (docs/irnet.md, "Running it"): relation labels
on 2 processes and skip-if-current, the relation network on the Trainer (SIGTERM -> exit 75 -> exact
resume, drift refusal), random-walk labels with their report, and `vwe pipeline --until irn`; plus the
loader's IRNet augmentation and the batched affinity labels against vwe.nets.irn's."""
from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, TINY, launch_cmd, run_vwe
from vwe.formats.config import IrnConfig, load_config
from vwe.labels.pathindex import path_index
from vwe.nets.irn import affinity_labels
from vwe.runtime.errors import ConfigError

DEMO = str(REPO / "configs" / "demo.yaml")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# the relation network on 64 px crops: 16x16 feature maps, so the affinity radius must be below 9
IRN_TINY = ["irn.label_split=val", "irn.crop_size=64", "irn.radius=5", "irn.batch_size=4", "irn.pretrained=none",
            "irn.mixed_precision=no", "irn.checkpoint_every=0"]

try:
    import pydensecrf.densecrf  # noqa: F401
except ImportError:
    pytest.skip("the crf extra (pydensecrf2) is not installed: relation labels need it", allow_module_level=True)


def _overrides(root: Path, run: Path, *extra: str) -> list[str]:
    return [*TINY, f"data.root={root}", f"output.run_dir={run}", *IRN_TINY, *extra]


def _vwe(command: str, root: Path, run: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    return run_vwe(command, "--config", DEMO, *_overrides(root, run, *extra), cwd=REPO, check=check)


def _copy_run(src: Path, dst: Path) -> Path:
    """A run folder without the relation network's checkpoints and weights (100 MB each)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("checkpoints", "final", "metrics.jsonl", "summary.json",
                                                            "*.lock"))
    return dst


@pytest.fixture(scope="module")
def cam_run(synthetic_shards, tmp_path_factory) -> Path:
    """A run with random CAM-network weights and its CAMs of 'val' (12 images) from `vwe infer`."""
    from vwe.formats.checkpoint import FINAL_WEIGHTS_NAME, export_weights
    from vwe.nets.cam import build_model
    run = tmp_path_factory.mktemp("irn") / "cams"
    cfg = load_config(DEMO, _overrides(synthetic_shards, run))
    torch.manual_seed(0)
    export_weights(build_model(cfg.model).state_dict(), cfg.to_dict(), run / FINAL_WEIGHTS_NAME)
    _vwe("infer", synthetic_shards, run)
    assert len(list((run / "cams").glob("*.npz"))) == 12
    return run


@pytest.fixture(scope="module")
def trained(synthetic_shards, cam_run, tmp_path_factory) -> Path:
    """cam_run + relation labels + a relation network trained 2 steps."""
    run = _copy_run(cam_run, tmp_path_factory.mktemp("irn") / "trained")
    _vwe("irn-labels", synthetic_shards, run)
    _vwe("irn-train", synthetic_shards, run, "irn.max_steps=2")
    assert (run / "irn" / "final" / "model.safetensors").is_file()
    return run


# ------------------------------------------------------------------------------------------ in process

def _pair(w=70, h=50):
    """An image whose grey level is 40 x its label (labels 1..4 in blocks)."""
    label = np.zeros((h, w), np.uint8)
    label[: h // 2, : w // 2], label[: h // 2, w // 2:] = 1, 2
    label[h // 2:, : w // 2], label[h // 2:, w // 2:] = 3, 4
    image = np.repeat((label * 40)[..., None], 3, axis=2).astype(np.uint8)
    jpg, png = io.BytesIO(), io.BytesIO()
    Image.fromarray(image).save(jpg, format="JPEG", quality=100)
    Image.fromarray(label, mode="L").save(png, format="PNG")
    return jpg.getvalue(), png.getvalue()


def test_irn_augment_keeps_labels_aligned_reduced_x4_and_pads_like_irnet():
    from vwe.data.transforms import MEAN_UINT8, irn_augment
    jpg, png = _pair()
    padded = 0
    for seed in range(10):
        img, tgt = torch.empty(3, 64, 64, dtype=torch.uint8), torch.empty(16, 16, dtype=torch.uint8)
        irn_augment(jpg, png, np.random.default_rng(seed), (0.5, 1.5), 64, True, img, tgt, "x")
        assert set(torch.unique(tgt).tolist()) <= {1, 2, 3, 4, 255}
        # each label pixel at stride 4 sits on image pixels of its grey level (away from the block edges)
        grey = img[0].float()[2::4, 2::4]
        known = tgt != 255
        same = (torch.nn.functional.max_pool2d(tgt[None, None].float(), 3, 1, 1)[0, 0] ==
                -torch.nn.functional.max_pool2d(-tgt[None, None].float(), 3, 1, 1)[0, 0])
        inner = known & same
        assert (grey[inner] - 40 * tgt[inner].float()).abs().max() <= 8
        pad = img[0] == MEAN_UINT8[0]
        padded += int((~known).any())
        if (~known).any():  # the label's padding is where the image holds the mean colour (0 after normalising)
            assert pad[2::4, 2::4][~known & same].all()
    assert padded  # some scale drew a crop larger than the image
    again = torch.empty(3, 64, 64, dtype=torch.uint8), torch.empty(16, 16, dtype=torch.uint8)
    irn_augment(jpg, png, np.random.default_rng(3), (0.5, 1.5), 64, True, *again, "x")
    first = torch.empty(3, 64, 64, dtype=torch.uint8), torch.empty(16, 16, dtype=torch.uint8)
    irn_augment(jpg, png, np.random.default_rng(3), (0.5, 1.5), 64, True, *first, "x")
    assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])


def _irnet_affinity_sample(img: np.ndarray, label: np.ndarray, crop: int, scale: float, flip: bool,
                           u: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """IRNet's VOC12SegmentationDataset.__getitem__ (random crop) and VOC12AffinityDataset's label
    reduction, restated from voc12/dataloader.py and misc/imutils.py with its random draws given: rescale
    (PIL bicubic / nearest, sides np.round-ed), TorchvisionNormalize, left-right flip, get_random_crop_box
    (randrange(n) drawn as int(u * n)) with padding 0 / 255, then pil_rescale(label, 0.25, 0)."""
    def pil_rescale(a, s, resample):
        size = (int(np.round(a.shape[0] * s)), int(np.round(a.shape[1] * s)))
        return a if size == a.shape[:2] else np.asarray(Image.fromarray(a).resize(size[::-1], resample))
    img, label = pil_rescale(img, scale, Image.BICUBIC), pil_rescale(label, scale, Image.NEAREST)
    img = (img / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    if flip:
        img, label = np.fliplr(img), np.fliplr(label)
    h, w = label.shape
    box = []
    for space, ui in ((h - crop, u[1]), (w - crop, u[0])):  # (cont, img) offsets of rows, then columns
        box.append((0, int(ui * (space + 1))) if space > 0 else (int(ui * (-space + 1)), 0))
    (ct, it), (cl, il) = box
    ch, cw = min(crop, h), min(crop, w)
    out_img, out_label = np.zeros((crop, crop, 3)), np.full((crop, crop), 255, np.uint8)
    out_img[ct:ct + ch, cl:cl + cw] = img[it:it + ch, il:il + cw]
    out_label[ct:ct + ch, cl:cl + cw] = label[it:it + ch, il:il + cw]
    return out_img.transpose(2, 0, 1), pil_rescale(out_label, 0.25, Image.NEAREST)


def test_irn_augment_equals_irnets_dataset_given_the_same_draws():
    """irn_augment against IRNet's own order of steps (scale -> normalise -> flip -> crop -> labels x0.25),
    its crop box and paddings, on a textured photo at scales that crop and that pad: the labels equal, the
    normalised image within PIL's bicubic against torch's (2 grey levels) and the pad colour's offset."""
    from vwe.data.transforms import irn_augment, normalize
    rng = np.random.default_rng(5)
    h, w, crop = 70, 90, 64
    yy, xx = np.mgrid[0:h, 0:w]
    label = ((yy * 3 // h) * 3 + xx * 3 // w + 1).astype(np.uint8)  # 9 blocks, labels 1..9
    label[30:40, 40:55] = 255
    photo = np.clip(label[..., None] * 25 + rng.integers(0, 30, (h, w, 3)) + (xx[..., None] * 1.2), 0, 255)
    jpg, png = io.BytesIO(), io.BytesIO()
    Image.fromarray(photo.astype(np.uint8)).save(jpg, format="JPEG", quality=95)
    Image.fromarray(label, mode="L").save(png, format="PNG")
    decoded = np.asarray(Image.open(io.BytesIO(jpg.getvalue())).convert("RGB"))
    seen = set()
    for seed in range(16):
        img, tgt = torch.empty(3, crop, crop, dtype=torch.uint8), torch.empty(crop // 4, crop // 4, dtype=torch.uint8)
        irn_augment(jpg.getvalue(), png.getvalue(), np.random.default_rng(seed), (0.5, 1.5), crop, True, img, tgt, "x")
        draws = np.random.default_rng(seed)  # irn_augment's draws, in its order: scale, flip, crop x, crop y
        scale = 0.5 + float(draws.random()) * 1.0
        flip = bool(draws.random() < 0.5)
        ux, uy = draws.random(2)
        want_img, want_label = _irnet_affinity_sample(decoded, label, crop, scale, flip, (ux, uy))
        assert np.array_equal(tgt.numpy(), want_label), seed
        diff = np.abs(normalize(img).numpy() - want_img)
        assert diff.max() <= 2.5 / (255 * 0.224) and diff.mean() < 0.01, (seed, diff.max(), diff.mean())
        seen |= {"cut" if round(w * scale) > crop else "", "padded" if round(h * scale) < crop else "",
                 "flipped" if flip else "kept"}
    assert {"cut", "padded", "flipped", "kept"} <= seen, seen


def test_batched_affinity_labels_equal_irnets_per_image_ones():
    from vwe.stages.irn import affinity_label_tensors
    rng = np.random.default_rng(0)
    labels = rng.choice(np.array([0, 2, 7, 255], np.uint8), size=(3, 16, 16))
    index = path_index(5, (16, 16))
    batched = affinity_label_tensors(torch.from_numpy(labels), index)
    for b in range(3):
        for got, want in zip(batched, affinity_labels(labels[b], index)):
            assert np.array_equal(got[b].numpy(), want)


def test_a_radius_too_large_for_the_crop_is_a_config_error():
    from vwe.stages.irn import check_irn_crop
    with pytest.raises(ConfigError, match=r"irn.radius=10 with irn.crop_size=64"):
        check_irn_crop(IrnConfig(crop_size=64, radius=10))
    with pytest.raises(ConfigError, match=r"irn.crop_size=66 must be a multiple of 4"):
        check_irn_crop(IrnConfig(crop_size=66, radius=3))
    check_irn_crop(IrnConfig(crop_size=64, radius=8))


# --------------------------------------------------------------------------------------- with processes

@pytest.mark.multiprocess
def test_relation_labels_on_two_processes_then_skipped_when_current(synthetic_shards, cam_run, tmp_path):
    run = _copy_run(cam_run, tmp_path / "run")
    proc = subprocess.run(launch_cmd(2, "irn-labels", "--config", DEMO, *_overrides(synthetic_shards, run)),
                          cwd=REPO, env=ENV, text=True, capture_output=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    labels = run / "irn" / "ir_labels"
    pngs = sorted(p.stem for p in labels.glob("*.png"))
    assert len(pngs) == 12
    ranks = [json.loads((labels / f"manifest-rank{r:03d}.json").read_text()) for r in (0, 1)]
    assert sorted(ranks[0]["ids"] + ranks[1]["ids"]) == pngs and len(ranks[0]["ids"]) == 6
    for p in labels.glob("*.png"):
        values = set(np.unique(np.asarray(Image.open(p))).tolist())
        assert values <= set(range(21)) | {255}
    report = json.loads((labels / "report.json").read_text())
    assert report["num_images"] == 12 and report["processes"] == 2
    assert abs(sum(report["pixel_fractions"].values()) - 1) < 1e-9 and report["confident_accuracy"] is not None
    split = json.loads((run / "irn" / "shards" / "ir_labels.json").read_text())
    assert split["targets"]["count"] == 12 and split["targets"]["source_split"] == "val"

    again = _vwe("irn-labels", synthetic_shards, run)
    assert "0 written, 12 already done" in again.stdout and "0 written" in again.stdout.split("prepare:")[1]
    changed = _vwe("irn-labels", synthetic_shards, run, "irn.conf_fg_thres=0.5")
    assert "12 written, 0 already done, 12 replaced" in changed.stdout


def _final(run: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(run / "irn" / "final" / "model.safetensors"))


def test_relation_network_resumes_exactly_after_sigterm_and_refuses_drift(synthetic_shards, trained, tmp_path):
    extra = ("irn.max_steps=6", "train.deterministic=true")
    reference = _copy_run(trained, tmp_path / "reference")
    _vwe("irn-train", synthetic_shards, reference, *extra)

    run = _copy_run(trained, tmp_path / "run")
    cmd = launch_cmd(1, "irn-train", "--config", DEMO, *_overrides(synthetic_shards, run, *extra))
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    metrics, end = run / "irn" / "metrics.jsonl", time.time() + 300
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
        assert proc.poll() is None and time.time() < end, proc.communicate()
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, out + err
    saved = sorted((run / "irn" / "checkpoints").glob("step-*"))
    assert len(saved) == 1 and 2 <= int(saved[0].name[5:]) < 6 and not (run / "irn" / "final").exists()

    resumed = _vwe("irn-train", synthetic_shards, run, *extra)
    assert f"resumed from {saved[0]}" in resumed.stdout + resumed.stderr
    a, b = _final(reference), _final(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    lines = [json.loads(l) for l in metrics.read_text().splitlines()]
    assert {"loss/pos_aff", "loss/neg_aff", "loss/dp_fg", "loss/dp_bg", "lr/boundary", "lr/displacement"} <= set(lines[0])
    assert lines[0]["lr/displacement"] == pytest.approx(10 * lines[0]["lr/boundary"])

    drift = _vwe("irn-train", synthetic_shards, run, *extra, "irn.lr=0.05", check=False)
    assert drift.returncode == 2 and "irn.lr" in drift.stderr, drift.stderr[-2000:]


def test_random_walk_writes_scored_labels_and_skips_when_current(synthetic_shards, trained):
    first = _vwe("random-walk", synthetic_shards, trained)
    out = trained / "irn" / "pseudo_labels"
    pngs = list(out.glob("*.png"))
    assert len(pngs) == 12
    for p in pngs:  # the walk labels every pixel: no 255
        assert set(np.unique(np.asarray(Image.open(p))).tolist()) <= set(range(21))
    report = json.loads((out / "report.json").read_text())
    assert report["num_images"] == report["scored"] == 12 and 0 <= report["miou"] <= 1
    assert 0 <= report["cam_threshold"]["miou"] <= 1 and report["settings"]["walk_radius"] == 5
    assert "mIoU against the masks (12 images)" in first.stdout and (out / "report.md").is_file()
    again = _vwe("random-walk", synthetic_shards, trained)
    assert "0 written, 12 already done" in again.stdout
    assert json.loads((out / "report.json").read_text())["miou"] == report["miou"]


def test_pipeline_until_irn_then_deeplab_on_the_walk_labels(synthetic_shards, tmp_path):
    run = tmp_path / "run"
    proc = run_vwe("pipeline", "--config", DEMO, "--until", "irn",
                   *_overrides(synthetic_shards, run, "train.max_steps=2", "irn.max_steps=2"), cwd=REPO)
    assert (run / "final" / "model.safetensors").is_file() and len(list((run / "cams").glob("*.npz"))) == 12
    irn = run / "irn"
    assert len(list((irn / "ir_labels").glob("*.png"))) == 12 and (irn / "shards" / "ir_labels.json").is_file()
    assert json.loads((irn / "summary.json").read_text())["steps"] == 2
    report = json.loads((irn / "pseudo_labels" / "report.json").read_text())
    assert report["num_images"] == 12 and report["miou"] is not None
    assert "Pseudo labels by random walk" in proc.stdout

    # DeepLab on the walk's labels: what is done is skipped, the label split comes from irn/pseudo_labels
    seg = ["seg.labels=irn", "seg.backbone=resnet50", "seg.pretrained=none", "seg.crop_size=64", "seg.max_steps=2",
           "seg.batch_size=2", "seg.grad_accum=1", "seg.msc_scales=[]", "seg.test_scales=[1.0]", "seg.crf=false",
           "seg.mixed_precision=no", "seg.eval_split=val"]
    proc = run_vwe("pipeline", "--config", DEMO, "--until", "segment",
                   *_overrides(synthetic_shards, run, "train.max_steps=2", "irn.max_steps=2", *seg), cwd=REPO)
    out = proc.stdout + proc.stderr
    assert "match this config; skipping" in out and out.count("0 written, 12 already done") >= 3, out[-3000:]
    seg_split = load_config(DEMO, _overrides(synthetic_shards, run, *seg)).seg.train_split
    split = json.loads((run / "seg" / "shards" / f"{seg_split}.json").read_text())
    assert split["targets"]["from"] == str((irn / "pseudo_labels").resolve()) and split["targets"]["source_split"] == "val"
    assert json.loads((run / "seg" / "eval" / "val" / "report.json").read_text())["num_images"] == 12


@pytest.mark.multiprocess
@pytest.mark.parametrize("launch", ["launch/cpu.yaml", "launch/deepspeed_zero2.yaml"])
def test_relation_network_on_two_processes_plain_and_zero2(synthetic_shards, trained, tmp_path, launch):
    """The relation network's frozen backbone under DDP and under DeepSpeed ZeRO-2 (bf16): both ranks train
    the same replica and the exported weights hold only finite values."""
    if "deepspeed" in launch:
        pytest.importorskip("deepspeed", reason="the deepspeed extra is not installed")
    run = _copy_run(trained, tmp_path / "run")
    precision = "bf16" if "deepspeed" in launch else "no"
    cmd = launch_cmd(2, "irn-train", "--config", DEMO,
                     *_overrides(synthetic_shards, run, "irn.max_steps=3", "irn.checkpoint_every=3"),
                     f"irn.mixed_precision={precision}", launch_config=launch)
    env = {k: v for k, v in ENV.items() if k != "ACCELERATE_USE_CPU"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, text=True, capture_output=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    s = json.loads((run / "irn" / "summary.json").read_text())
    assert s["processes"] == 2 and s["replicas_identical"] and s["batches_per_rank"] == [3, 3], s
    assert s["distributed_type"] == ("DEEPSPEED" if "deepspeed" in launch else "MULTI_CPU")
    if "deepspeed" in launch:
        assert s["deepspeed"]["zero_stage"] == 2 and s["deepspeed"]["world_size"] == 2
    assert (run / "irn" / "checkpoints" / "step-000003").is_dir()
    final = _final(run)
    assert all(torch.isfinite(t).all() for t in final.values() if t.is_floating_point())
