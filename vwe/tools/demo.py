"""`vwe demo`: synthetic data -> shards -> the whole chain on every local core or GPU: CAM network, CAMs and
their mIoU, CRF pseudo labels, a DeepLab trained on them and its val mIoU, IRNet's random-walk pseudo labels
from the same CAMs, side by side; pictures."""
from __future__ import annotations

import dataclasses
import json
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
    # CAMs and pseudo labels for the training images (as in the paper); DeepLab is scored on val
    overrides = [f"data.root={shards}", f"output.run_dir={run}", "data.infer_split=train"]
    load_config(config, overrides)  # fail here, not in every rank
    # the CRF chain to DeepLab, then IRNet's labels from the same CAMs (training, CAMs and their
    # evaluation are skipped the second time: they are current)
    for until in ("segment", "irn"):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(launch),
               "--num_processes", str(n), "-m", "vwe", "pipeline", "--config", str(config), "--until", until,
               *overrides]
        print(f"[demo] launching {n} process(es): {' '.join(cmd[2:])}")
        code = subprocess.call(cmd)
        if code:
            return code

    cfg = load_config(config, overrides)
    print("[demo] the CAMs of val, to compare with DeepLab on the same images")
    cam_val = _cam_miou_on_val(cfg, workdir / "cam_val", run)
    from vwe.report.visualize import visualize
    ids = sorted(p.stem for p in (run / "cams").glob("*.npz"))[:3]
    pictures = run / "eval" / "pictures"
    for i in ids:
        visualize(cfg, [i], pictures / f"{i}.png")
    print(f"\n[demo] done in {time.perf_counter() - started:.0f} s\n")
    print(summary_table(run, cam_val))
    print(f"\n[demo] CAM report:          {run / 'eval' / 'report.json'}")
    print(f"[demo] pseudo-label report: {run / 'pseudo_labels' / 'report.json'}")
    print(f"[demo] IRNet label report:  {run / 'irn' / 'pseudo_labels' / 'report.json'}")
    print(f"[demo] DeepLab report:      {run / 'seg' / 'eval' / 'val' / 'report.json'}")
    print(f"[demo] pictures:            {pictures}")
    print(f"[demo] tensorboard --logdir {run / 'tb'}  (DeepLab: {run / 'seg' / 'tb'})")
    return 0


def _cam_miou_on_val(cfg, out: Path, run: Path) -> float:
    """CAM mIoU on val with the run's CAM network, in its own folder (the run's eval/ holds train's)."""
    from vwe.stages.evaluate import evaluate
    from vwe.stages.infer import infer
    val = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, infer_split="val"),
                              infer=dataclasses.replace(cfg.infer, weights=str(run / "final" / "model.safetensors")),
                              output=dataclasses.replace(cfg.output, run_dir=str(out), tensorboard=False))
    if infer(val) or evaluate(val):
        raise VweError("demo: CAMs of val could not be made or scored (see above)")
    return json.loads((out / "eval" / "report.json").read_text())["miou"]


def summary_table(run: Path, cam_val: float) -> str:
    """The chain's numbers side by side (mIoU, %)."""
    cam = json.loads((run / "eval" / "report.json").read_text())
    labels = json.loads((run / "pseudo_labels" / "report.json").read_text())
    walk = json.loads((run / "irn" / "pseudo_labels" / "report.json").read_text())
    seg = json.loads((run / "seg" / "eval" / "val" / "report.json").read_text())
    rows = [("CAMs (bkg threshold)", "train", cam["miou"]), ("CRF pseudo labels", "train", labels["miou"]),
            ("IRNet pseudo labels (random walk)", "train", walk["miou"]),
            ("CAMs (bkg threshold)", "val", cam_val), ("DeepLab on the pseudo labels", "val", seg["miou"])]
    lines = ["| what | split | mIoU |", "|---|---|---|"]
    lines += [f"| {what} | {split} | {100 * miou:.1f} |" for what, split, miou in rows]
    return "\n".join(lines)
