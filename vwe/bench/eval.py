"""`vwe bench eval`: seconds to evaluate a split's CAMs (completeness check, masks from the shards,
confusion matrix), with and without the background sweep.

CAMs are made up for the benchmark (random maps for each image's positive classes, stored like
`vwe infer` stores them) in a temporary folder, so only the shards of `data.infer_split` are needed.
"""
from __future__ import annotations

import copy
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from vwe.formats.cams import CamRecord, write_cam
from vwe.formats.config import Config
from vwe.data.loader import infer_samples
from vwe.runtime.files import atomic_write


def write_random_cams(cfg: Config, out: Path, seed: int = 0) -> int:
    rng = np.random.default_rng(seed)
    store = np.float16 if cfg.infer.dtype == "float16" else np.float32
    n = 0
    for s in infer_samples(cfg.data, cfg.infer, 0, 1, with_scales=False, with_image=False):
        h, w = s["size"]
        keys = np.flatnonzero(s["labels"].numpy() > 0.5)
        high = rng.random((len(keys), h, w), dtype=np.float32)
        cam = high[:, ::4, ::4]
        write_cam(out / f"{s['key']}.npz", CamRecord(keys, cam.astype(store), high.astype(store), "bench"))
        n += 1
    return n


def run(cfg: Config, args) -> int:
    from vwe.stages.evaluate import evaluate
    with tempfile.TemporaryDirectory() as tmp:
        cfg = copy.deepcopy(cfg)
        cfg.infer.out_dir = str(Path(tmp) / "cams")
        cfg.eval.cams = cfg.infer.out_dir  # made-up CAMs: no weights to match them against
        cfg.output.run_dir = str(Path(tmp) / "run")
        t0 = time.perf_counter()
        n = write_random_cams(cfg, Path(cfg.infer.out_dir))
        print(f"wrote {n} made-up CAMs ({cfg.infer.dtype}) in {time.perf_counter() - t0:.1f} s")
        figures = {"images": n, "split": cfg.data.infer_split, "dtype": cfg.infer.dtype}
        for sweep in (False, True):
            t0 = time.perf_counter()
            evaluate(cfg, sweep=sweep)
            seconds = time.perf_counter() - t0
            report = json.loads((Path(cfg.output.run_dir) / "eval" / "report.json").read_text())
            key = "sweep" if sweep else "single"
            figures[f"{key}_seconds"] = round(seconds, 2)
            figures[f"{key}_thresholds"] = len(report.get("sweep", {}).get("thresholds", [cfg.eval.bkg]))
    print(f"evaluation of {n} images: {figures['single_seconds']} s at one threshold, "
          f"{figures['sweep_seconds']} s with the sweep ({figures['sweep_thresholds']} thresholds)")
    if args.json:
        atomic_write(args.json, json.dumps(figures, indent=2))
    return 0
