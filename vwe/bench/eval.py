"""`vwe bench eval`: seconds to evaluate a split's CAMs (completeness check, masks from the shards,
confusion matrix), with and without the background sweep, at eval.num_workers threads and at one.

CAMs are made up for the benchmark (random maps for each image's positive classes, stored like
`vwe infer` stores them) in a temporary folder, so only the shards of `data.infer_split` are needed.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from vwe.formats.cams import CamRecord, write_cam
from vwe.formats.config import Config
from vwe.data.loader import infer_samples
from vwe.runtime.dist import distributed_state
from vwe.runtime.files import atomic_write


def write_random_cams(cfg: Config, out: Path, seed: int = 0) -> tuple[int, float]:
    """Made-up CAMs for every image of data.infer_split; (images, mean pixels per image)."""
    rng = np.random.default_rng(seed)
    store = np.float16 if cfg.infer.dtype == "float16" else np.float32
    n, pixels = 0, 0
    for s in infer_samples(cfg.data, cfg.infer, 0, 1, with_scales=False, with_image=False):
        h, w = s["size"]
        keys = np.flatnonzero(s["labels"].numpy() > 0.5)
        high = rng.random((len(keys), h, w), dtype=np.float32)
        cam = high[:, ::4, ::4]
        write_cam(out / f"{s['key']}.npz", CamRecord(keys, cam.astype(store), high.astype(store), "bench"))
        n, pixels = n + 1, pixels + h * w
    return n, pixels / max(n, 1)


def time_evaluate(cfg: Config, sweep: bool) -> tuple[float, dict]:
    """Seconds of `evaluate` (the function `vwe evaluate` calls, here in this process) and its report."""
    from vwe.stages.evaluate import evaluate
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # the table, once per run: not what is measured
        evaluate(cfg, sweep=sweep)
    seconds = time.perf_counter() - t0
    return seconds, json.loads((Path(cfg.output.run_dir) / "eval" / "report.json").read_text())


def run(cfg: Config, args) -> int:
    """`vwe bench eval`: evaluation at eval.num_workers threads (--workers sets it), without and with the
    sweep, and at one thread for comparison."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = copy.deepcopy(cfg)
        cfg.infer.out_dir = str(Path(tmp) / "cams")
        cfg.eval.cams = cfg.infer.out_dir  # made-up CAMs: no weights to match them against
        cfg.output.run_dir = str(Path(tmp) / "run")
        cfg.output.tensorboard = False
        if args.workers is not None:
            cfg.eval.num_workers = args.workers
        t0 = time.perf_counter()
        n, pixels = write_random_cams(cfg, Path(cfg.infer.out_dir))
        print(f"wrote {n} made-up CAMs ({cfg.infer.dtype}) in {time.perf_counter() - t0:.1f} s")
        figures = {"images": n, "split": cfg.data.infer_split, "dtype": cfg.infer.dtype,
                   "pixels_per_image": round(pixels)}
        distributed_state()  # the process group (and Accelerate's import) is start-up, not evaluation
        for sweep in (False, True):
            seconds, report = time_evaluate(cfg, sweep)
            key = "sweep" if sweep else "single"
            figures[f"{key}_seconds"] = round(seconds, 2)
            figures[f"{key}_thresholds"] = len(report.get("sweep", {}).get("thresholds", [cfg.eval.bkg]))
            figures["threads"] = report["threads_per_process"]
        one = copy.deepcopy(cfg)
        one.eval.num_workers = 1
        figures["one_thread_single_seconds"] = round(time_evaluate(one, False)[0], 2)
    figures["img_per_s"] = round(n / figures["single_seconds"], 1)
    print(f"evaluation of {n} images ({figures['threads']} threads): {figures['single_seconds']} s at one threshold "
          f"({figures['img_per_s']} img/s), {figures['sweep_seconds']} s with the sweep ({figures['sweep_thresholds']} "
          f"thresholds); {figures['one_thread_single_seconds']} s at one threshold on one thread")
    if args.json:
        atomic_write(args.json, json.dumps(figures, indent=2))
    return 0
