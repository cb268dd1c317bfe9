"""Evaluation on crafted CAMs over real shards: exact confusion counts, the sweep, completeness errors,
and the same result for 1, 2 and 3 processes."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, launch_cmd, run_vwe
from vwe.cam_io import CamRecord, read_cam, write_cam
from vwe.config import load_config
from vwe.data.loader import infer_samples

DEMO = str(REPO / "configs" / "demo.yaml")


def overrides(shards: Path, run: Path, *extra: str) -> list[str]:
    return [f"data.root={shards}", f"output.run_dir={run}", "data.num_workers=0", *extra]


def ground_truth(shards: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    cfg = load_config(DEMO, overrides(shards, Path("unused")))
    out = {}
    for s in infer_samples(cfg, 0, 1, with_scales=False):
        out[s["key"]] = (s["mask"].numpy(), np.flatnonzero(s["labels"].numpy() > 0.5))
    return out


def final_weights(run: Path, value: float = 0.0) -> str:
    """A (tiny) weights file where `vwe infer` looks for the run's final weights; returns its SHA-256."""
    import torch
    from vwe.checkpoint import FINAL_WEIGHTS_NAME, export_weights
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
