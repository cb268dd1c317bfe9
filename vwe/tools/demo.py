"""`vwe demo`: synthetic data -> shards -> train -> infer -> evaluate -> pictures, on every local core or GPU."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from vwe.formats.config import load_config, repo_configs_dir
from vwe.runtime.errors import VweError

DEMO_TRAIN, DEMO_VAL, DEMO_SIZE = 320, 48, 128


def launch_config(gpus: int) -> Path:
    name = "cpu.yaml" if gpus == 0 else ("single_gpu.yaml" if gpus == 1 else "multi_gpu.yaml")
    return repo_configs_dir().parent / "launch" / name


def run_demo(workdir: Path, processes: int = 0) -> int:
    """Run the whole pipeline on synthetic data in `workdir`; prints the table and where results are."""
    from vwe.data.prepare import prepare
    from vwe.data.synthetic import write_dataset

    config = repo_configs_dir() / "demo.yaml"
    launch = launch_config(torch.cuda.device_count())
    for needed in (config, launch):
        if not needed.is_file():
            raise VweError(f"demo: {needed} not found; run the demo from a checkout of vwe (or the container)")
    workdir = workdir.resolve()
    voc, shards, run = workdir / "synthetic", workdir / "shards", workdir / "run"
    started = time.perf_counter()
    if not (voc / "DONE").is_file():
        print(f"[demo] writing {DEMO_TRAIN} + {DEMO_VAL} synthetic images to {voc}")
        write_dataset(voc, n_train=DEMO_TRAIN, n_val=DEMO_VAL, seed=0, size=DEMO_SIZE, sbd=False)
        (voc / "DONE").write_text("ok\n")
    print(f"[demo] preparing shards in {shards}")
    prepare(voc, None, shards, shard_size=64)

    gpus = torch.cuda.device_count()
    n = processes or gpus or max(1, min(os.cpu_count() or 1, 2))
    overrides = [f"data.root={shards}", f"output.run_dir={run}"]
    load_config(config, overrides)  # fail here, not in every rank
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(launch),
           "--num_processes", str(n), "-m", "vwe", "pipeline", "--config", str(config), *overrides]
    print(f"[demo] launching {n} process(es): {' '.join(cmd[2:])}")
    code = subprocess.call(cmd)
    if code:
        return code

    from vwe.report.visualize import visualize
    cfg = load_config(config, overrides)
    ids = sorted(p.stem for p in (run / "cams").glob("*.npz"))[:3]
    pictures = run / "eval" / "pictures"
    for i in ids:
        visualize(cfg, [i], pictures / f"{i}.png")
    print(f"\n[demo] done in {time.perf_counter() - started:.0f} s")
    print(f"[demo] table:    {run / 'eval' / 'table.md'}")
    print(f"[demo] report:   {run / 'eval' / 'report.json'}")
    print(f"[demo] pictures: {pictures}")
    print(f"[demo] tensorboard --logdir {run / 'tb'}")
    return 0
