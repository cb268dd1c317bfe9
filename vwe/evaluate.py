"""CAM mIoU: each rank scores its part of the split, counts are summed over ranks, rank 0 reports.

Before any score is trusted the CAM folder is checked for completeness: every id of the split has a
readable CAM of the mask's size, and all CAMs come from one checkpoint.
"""
from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from vwe.cam_io import cam_dir_for, read_cam
from vwe.config import Config
from vwe.data.loader import infer_samples
from vwe.dist import all_reduce_sum, distributed_state, gather_objects
from vwe.errors import DataError
from vwe.metrics import (SHORT_NAMES, confusions_from_histogram, format_table, iou_per_class, mean_iou,
                         pixel_accuracy, sweep_histogram, sweep_thresholds)

NUM_LABELS = 21  # background + 20 VOC classes


def _listing(ids: list[str], limit: int) -> str:
    shown = ", ".join(sorted(ids)[:limit])
    return shown + (f", ... ({len(ids) - limit} more)" if len(ids) > limit else "")


def _score_part(cfg: Config, rank: int, world: int, cam_dir: Path, thresholds: np.ndarray) -> dict:
    """This rank's histogram and the problems it found (never raises for one bad CAM: all are listed)."""
    hist = np.zeros((NUM_LABELS, NUM_LABELS, len(thresholds) + 1), np.int64)
    missing, bad = [], []
    by_checkpoint: dict[str, list[str]] = defaultdict(list)
    scored = 0
    for sample in infer_samples(cfg, rank, world, with_scales=False, with_image=False):
        key, mask = sample["key"], sample["mask"]
        if mask is None:
            bad.append(f"{key}: the split has no ground-truth mask for it")
            continue
        path = cam_dir / f"{key}.npz"
        if not path.exists():
            missing.append(key)
            continue
        try:
            rec = read_cam(path, num_classes=NUM_LABELS - 1)
        except DataError as e:
            bad.append(str(e))
            continue
        gt = mask.numpy() if hasattr(mask, "numpy") else np.asarray(mask)
        if rec.high_res.shape[1:] != gt.shape:
            bad.append(f"CAM file {path}: size {rec.high_res.shape[1:]} differs from its mask {gt.shape}")
            continue
        by_checkpoint[rec.checkpoint].append(key)
        hist += sweep_histogram(rec.high_res, rec.keys, gt, thresholds, NUM_LABELS)
        scored += 1
    return {"hist": hist, "missing": missing, "bad": bad, "by_checkpoint": dict(by_checkpoint),
            "scored": scored}


def _check_complete(parts: list[dict], cfg: Config, cam_dir: Path) -> tuple[list[str], list[str]]:
    limit = cfg.eval.max_listed
    bad = [b for p in parts for b in p["bad"]]
    if bad:
        raise DataError(f"{len(bad)} CAM problem(s) in {cam_dir}:\n  " + "\n  ".join(bad[:limit]) +
                        (f"\n  ... ({len(bad) - limit} more)" if len(bad) > limit else ""))
    by_ckpt: dict[str, list[str]] = defaultdict(list)
    for p in parts:
        for ckpt, ids in p["by_checkpoint"].items():
            by_ckpt[ckpt].extend(ids)
    if len(by_ckpt) > 1:
        lines = [f"checkpoint {c[:12]}: {len(ids)} CAMs, e.g. {_listing(ids, 5)}" for c, ids in by_ckpt.items()]
        raise DataError(f"CAMs in {cam_dir} come from {len(by_ckpt)} different checkpoints; delete the stale "
                        f"ones and re-run inference:\n  " + "\n  ".join(lines))
    missing = [k for p in parts for k in p["missing"]]
    if missing and not cfg.eval.allow_missing:
        raise DataError(f"{len(missing)} id(s) of split '{cfg.data.infer_split}' have no CAM in {cam_dir} "
                        f"(set eval.allow_missing=true to evaluate the rest): {_listing(missing, limit)}")
    return missing, list(by_ckpt)


def evaluate(cfg: Config, sweep: bool = False) -> int:
    """Score the run's CAMs against the ground truth; rank 0 writes eval/report.json and eval/table.md."""
    state = distributed_state()
    cam_dir = cam_dir_for(cfg)
    if not cam_dir.is_dir():
        raise DataError(f"CAM folder {cam_dir} does not exist: run `vwe infer` first")
    bkg = np.float32(cfg.eval.bkg)
    thresholds = sweep_thresholds(*cfg.eval.sweep, extra=(float(bkg),)) if sweep else np.array([bkg])
    start = time.perf_counter()
    part = _score_part(cfg, state.process_index, state.num_processes, cam_dir, thresholds)
    hist = all_reduce_sum(part.pop("hist"))
    parts = gather_objects(part)
    missing, checkpoints = _check_complete(parts, cfg, cam_dir)
    confs = confusions_from_histogram(hist)
    if not state.is_main_process:
        return 0
    report = _report(cfg, confs, thresholds, bkg, missing, checkpoints, sum(p["scored"] for p in parts),
                     time.perf_counter() - start, state.num_processes)
    out = Path(cfg.output.run_dir) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    table = format_table(np.array([np.nan if v is None else v for v in report["iou"].values()]), report["miou"])
    text = f"CAM mIoU on '{cfg.data.infer_split}' ({report['num_images']} images, bkg={cfg.eval.bkg}):\n\n{table}"
    if sweep:
        text += f"\nsweep: best bkg={report['sweep']['best_bkg']:.2f} -> mIoU {100 * report['sweep']['best_miou']:.1f}\n"
    (out / "table.md").write_text(text)
    print(text + f"\nreport: {out / 'report.json'}\ntable:  {out / 'table.md'}")
    return 0


def _report(cfg: Config, confs: np.ndarray, thresholds: np.ndarray, bkg: np.float32, missing: list[str],
            checkpoints: list[str], scored: int, seconds: float, world: int) -> dict:
    main = int(np.flatnonzero(thresholds == bkg)[0])
    conf = confs[main]
    iou = iou_per_class(conf)
    report = {
        "split": cfg.data.infer_split,
        "bkg": float(cfg.eval.bkg),
        "miou": mean_iou(conf),
        "pixel_accuracy": pixel_accuracy(conf),
        "iou": {name: (None if np.isnan(v) else float(v)) for name, v in zip(SHORT_NAMES, iou)},
        "num_images": scored,
        "missing": sorted(missing),
        "checkpoint": checkpoints[0] if checkpoints else None,
        "confusion": conf.tolist(),
        "processes": world,
        "seconds": round(seconds, 3),
    }
    if len(thresholds) > 1:
        mious = [mean_iou(c) for c in confs]
        best = int(np.nanargmax(mious))
        report["sweep"] = {"thresholds": [round(float(t), 6) for t in thresholds],
                           "miou": mious, "best_bkg": round(float(thresholds[best]), 6),
                           "best_miou": mious[best]}
    return report
