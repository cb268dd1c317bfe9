"""CAM mIoU: each rank scores its part of the split, counts are summed over ranks, rank 0 reports.

Before any score is trusted the inputs are checked: every id of the split has a readable CAM of the
mask's size (finite scores, class indices 0..19 once each), every mask holds only 0..20 and 255, all
CAMs come from one weights file, and that file is the one `vwe infer` would use now, unless
`eval.cams` names a folder to score as it is. Samples skipped under `data.on_corrupt: skip` are listed
in the report.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vwe.data.voc import NUM_LABELS
from vwe.report.board import log_evaluation
from vwe.formats.cams import cam_dir_for, cams_by_weights, read_cam_for
from vwe.formats.config import Config
from vwe.data.loader import infer_ranges, infer_samples
from vwe.data.index import load_index
from vwe.runtime.dist import sum_over_ranks, distributed_state, gather_objects
from vwe.runtime.errors import CheckpointError, DataError, id_listing, problem_list
from vwe.runtime.files import atomic_write, file_sha256
from vwe.runtime.parallel import ordered_map, usable_cores
from vwe.report.miou import (confusions_from_histogram, format_table, mask_value_problem, mean_iou, scores, sweep_histogram, sweep_thresholds)
from vwe.runtime.skips import SkipPolicy, unseen_after


def expected_weights(cfg: Config) -> tuple[Path, str] | None:
    """(weights file, SHA-256) that `vwe infer` would use now, which the CAMs must come from; None when
    eval.cams names a folder to score as it is."""
    if cfg.eval.cams:
        return None
    from vwe.stages.infer import weights_path  # torch and the model only when matching
    try:
        path = weights_path(cfg)
    except CheckpointError as e:
        raise CheckpointError(f"{e}\nthe CAMs are checked against the weights infer would use; to score a CAM "
                              f"folder as it is, without that check, set eval.cams=<folder>") from None
    return path, file_sha256(path)


@dataclass
class Scored:
    """One sample's outcome: its histogram and the weights that made its CAM, or why it was not scored."""
    key: str
    hist: np.ndarray | None = None
    weights: str = ""
    missing: bool = False      # no CAM file
    problem: str = ""          # a bad CAM, or no mask: listed, the evaluation fails
    mask_problem: str = ""     # mask values outside the classes: skippable under data.on_corrupt=skip


def score_sample(sample: dict, cam_dir: Path, thresholds: np.ndarray, shard_of: dict[str, str]) -> Scored:
    """Check one sample's mask and CAM and count its pixels (runs on a worker thread: no shared state)."""
    key, mask = sample["key"], sample["mask"]
    if mask is None:
        return Scored(key, problem=f"{key}: the split has no ground-truth mask for it")
    gt = mask.numpy() if hasattr(mask, "numpy") else np.asarray(mask)
    problem = mask_value_problem(gt, NUM_LABELS)
    if problem:
        return Scored(key, mask_problem=f"shard {shard_of.get(key, '?')}, sample {key!r}: mask {problem}")
    path = cam_dir / f"{key}.npz"
    if not path.exists():
        return Scored(key, missing=True)
    try:
        rec = read_cam_for(path, gt.shape, "mask", num_classes=NUM_LABELS - 1, strided=False)
    except DataError as e:
        return Scored(key, problem=str(e))
    return Scored(key, sweep_histogram(rec.high_res, rec.keys, gt, thresholds, NUM_LABELS), rec.weights_sha256)


def eval_threads(setting: int) -> int:
    """eval.num_workers, or for 0 the cores this process may run on divided among the node's processes."""
    if setting:
        return setting
    return max(1, usable_cores() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def _score_part(cfg: Config, rank: int, world: int, cam_dir: Path, thresholds: np.ndarray) -> dict:
    """This rank's histogram and the problems it found (never raises for one bad CAM or mask: all are
    listed, and every rank reaches the collectives). Masks are decoded and samples scored on
    eval_threads() threads; results are taken in sample order, so lists and counts never depend on them."""
    hist = np.zeros((NUM_LABELS, NUM_LABELS, len(thresholds) + 1), np.int64)
    missing, bad = [], []
    by_weights: dict[str, list[str]] = defaultdict(list)
    skips = SkipPolicy(cfg.data.on_corrupt, what="sample")
    idx = load_index(cfg.data.root, cfg.data.infer_split)
    shard_of = {k: s.name for s in idx.shards for k in s.keys}
    lo, hi = infer_ranges(idx.num_samples, world)[rank]
    threads = eval_threads(cfg.eval.num_workers)
    # masks only (no JPEG pixels): thread workers, without worker processes' start-up and transfers
    data = dataclasses.replace(cfg.data, worker_kind="thread")
    infer = dataclasses.replace(cfg.infer, num_workers=threads)
    samples = infer_samples(data, infer, rank, world, with_scales=False, with_image=False, skips=skips)
    scored = 0
    score = functools.partial(score_sample, cam_dir=cam_dir, thresholds=thresholds, shard_of=shard_of)
    for result in ordered_map(score, unseen_after(samples, idx.keys[lo:hi], skips), threads, "vwe-eval"):
        if result.mask_problem and skips.skipping:
            skips.skip(result.key, result.mask_problem, reason="mask values")
        elif result.problem or result.mask_problem:
            bad.append(result.problem or result.mask_problem)
        elif result.missing:
            missing.append(result.key)
        else:
            by_weights[result.weights].append(result.key)
            hist += result.hist
            scored += 1
    return {"hist": hist, "missing": missing, "bad": bad, "by_weights": dict(by_weights),
            "scored": scored, "skips": skips.state(), "range": hi - lo, "threads": threads}


def _check_complete(ranks: list[dict], cfg: Config, cam_dir: Path,
                    expected: tuple[Path, str] | None) -> tuple[list[str], list[str]]:
    limit = cfg.eval.max_listed
    bad = [b for p in ranks for b in p["bad"]]
    if bad:
        raise DataError(problem_list(f"{len(bad)} problem(s) with the CAMs in {cam_dir} or the masks of split "
                                     f"'{cfg.data.infer_split}'", bad, limit))
    now = (f"; `vwe infer` replaces those not from {expected[0]} (sha256 {expected[1]})" if expected else "")
    by_weights = cams_by_weights([p["by_weights"] for p in ranks], cam_dir, f"rerun `vwe infer`{now}")
    if expected and by_weights and expected[1] not in by_weights:
        (found,) = by_weights
        raise DataError(f"CAMs in {cam_dir} come from other weights (sha256 {found}) than those `vwe infer` "
                        f"would use now: {expected[0]} (sha256 {expected[1]}). Rerun `vwe infer` (it replaces "
                        f"CAMs of other weights), or score these as they are with eval.cams={cam_dir}")
    missing = [k for p in ranks for k in p["missing"]]
    if missing and not cfg.eval.allow_missing:
        raise DataError(f"{len(missing)} id(s) of split '{cfg.data.infer_split}' have no CAM in {cam_dir} "
                        f"(set eval.allow_missing=true to evaluate the rest): {id_listing(missing, limit)}")
    if not sum(p["scored"] for p in ranks):
        raise DataError(f"no image of split '{cfg.data.infer_split}' could be scored with the CAMs in {cam_dir} "
                        f"({len(missing)} without a CAM, {sum(len(p['skips']) for p in ranks)} skipped as corrupt)")
    return missing, list(by_weights)


def evaluate(cfg: Config, sweep: bool = False) -> int:
    """Score the CAMs against the ground truth; rank 0 writes eval/report.json and eval/table.md."""
    state = distributed_state()
    cam_dir = Path(cfg.eval.cams) if cfg.eval.cams else cam_dir_for(cfg)
    if not cam_dir.is_dir():
        hint = "check eval.cams" if cfg.eval.cams else "run `vwe infer` first"
        raise DataError(f"CAM folder {cam_dir} does not exist: {hint}")
    expected = expected_weights(cfg)
    bkg = np.float32(cfg.eval.bkg)
    thresholds = sweep_thresholds(*cfg.eval.sweep, extra=(float(bkg),)) if sweep else np.array([bkg])
    start = time.perf_counter()
    part = _score_part(cfg, state.process_index, state.num_processes, cam_dir, thresholds)
    hist = sum_over_ranks(part.pop("hist"))
    ranks = gather_objects(part)
    missing, weights = _check_complete(ranks, cfg, cam_dir, expected)
    confs = confusions_from_histogram(hist)
    if not state.is_main_process:
        return 0
    skips = SkipPolicy(cfg.data.on_corrupt, what="sample")
    skips.merge(p["skips"] for p in ranks)
    report = _report(cfg, confs, thresholds, bkg, missing, weights, sum(p["scored"] for p in ranks),
                     time.perf_counter() - start, state.num_processes)
    report.update(split_size=sum(p["range"] for p in ranks), threads_per_process=ranks[0]["threads"],
                  skipped=skips.report(), cams=str(cam_dir),
                  infer_mixed_precision=_inference_precision(cam_dir),
                  weights_matched=expected is not None, weights=str(expected[0]) if expected else None)
    out = Path(cfg.output.run_dir) / "eval"
    atomic_write(out / "report.json", json.dumps(report, indent=2), "evaluation report")
    table = format_table(np.array([np.nan if v is None else v for v in report["iou"].values()]), report["miou"])
    text = f"CAM mIoU on '{cfg.data.infer_split}' ({_coverage(report, skips)}, bkg={cfg.eval.bkg}):\n\n{table}"
    if sweep:
        text += f"\nsweep: best bkg={report['sweep']['best_bkg']:.2f} -> mIoU {100 * report['sweep']['best_miou']:.1f}\n"
    if not report["weights_matched"]:
        text += f"\nCAMs of {cam_dir} scored as they are (eval.cams): not matched to the weights infer would use\n"
    atomic_write(out / "table.md", text, "evaluation table")
    print(text + f"\nreport: {out / 'report.json'}\ntable:  {out / 'table.md'}")
    log_evaluation(cfg, report, cam_dir)
    return 0


def _inference_precision(cam_dir: Path) -> list[str]:
    """The precision(s) the CAMs were computed in, as inference's manifests record them."""
    found = set()
    for path in cam_dir.glob("manifest-rank*.json"):
        try:
            found.add(json.loads(path.read_text()).get("mixed_precision") or "unknown")
        except (OSError, ValueError, AttributeError):
            found.add("unknown")
    return sorted(found)


def _coverage(report: dict, skips: SkipPolicy) -> str:
    """'48 images', or '45 of 48 images: 2 skipped as corrupt (data.on_corrupt=skip), 1 without a CAM'."""
    n, total = report["num_images"], report["split_size"]
    if n == total:
        return f"{n} images"
    notes = []
    if skips.total:
        notes.append(f"{skips.total} skipped as corrupt (data.on_corrupt=skip, ids in report.json)")
    if report["missing"]:
        notes.append(f"{len(report['missing'])} without a CAM (eval.allow_missing)")
    return f"{n} of {total} images: " + ", ".join(notes)


def _report(cfg: Config, confs: np.ndarray, thresholds: np.ndarray, bkg: np.float32, missing: list[str],
            weights: list[str], scored: int, seconds: float, world: int) -> dict:
    main = int(np.flatnonzero(thresholds == bkg)[0])
    conf = confs[main]
    report = {
        "split": cfg.data.infer_split,
        "bkg": float(cfg.eval.bkg),
        **scores(conf),
        "num_images": scored,
        "missing": sorted(missing),
        "weights_sha256": weights[0] if weights else None,
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
