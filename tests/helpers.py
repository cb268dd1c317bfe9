"""Helpers shared by the test modules: running vwe as a real process, waiting for its files, comparing
runs, and small data and weights made on the spot (fixtures live in conftest.py)."""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from conftest import REPO, TINY, launch_cmd

DEMO = str(REPO / "configs" / "demo.yaml")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def train_args(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["train", "--config", DEMO, *TINY, f"data.root={shards}", f"output.run_dir={run_dir}", *extra]


def run_train(processes: int, shards: Path, run_dir: Path, *extra: str, timeout: float = 600):
    cmd = launch_cmd(processes, *train_args(shards, run_dir, *extra))
    return subprocess.run(cmd, cwd=REPO, env=ENV, text=True, capture_output=True, timeout=timeout)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return proc


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "final" / "model.safetensors"))


def assert_bit_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:5]}"


def wait_for(path_glob: tuple[Path, str], proc: subprocess.Popen, timeout: float = 300) -> Path:
    folder, pattern = path_glob
    end = time.time() + timeout
    while time.time() < end:
        found = sorted(folder.glob(pattern)) if folder.is_dir() else []
        if found:
            return found[-1]
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"process ended ({proc.returncode}) before {pattern} appeared\n{out}\n{err}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {folder}/{pattern}")


def popen_until(cmd: list[str], folder: Path, pattern: str, count: int = 1, timeout: float = 300,
                **kwargs) -> subprocess.Popen:
    """Start `cmd` (a real process, in the checkout) and return once `count` files match `pattern` in `folder`."""
    proc = subprocess.Popen(cmd, cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)
    end = time.monotonic() + timeout
    while not (folder.is_dir() and len(list(folder.glob(pattern))) >= count):
        assert proc.poll() is None and time.monotonic() < end, proc.communicate()
        time.sleep(0.02)
    return proc


def export_random_weights(cfg, run: Path) -> str:
    """Final weights of a randomly initialised CAM network of cfg.model, as `vwe train` exports them."""
    from vwe.formats.checkpoint import FINAL_WEIGHTS_NAME, export_weights
    from vwe.nets.cam import build_model
    torch.manual_seed(0)
    return export_weights(build_model(cfg.model).state_dict(), cfg.to_dict(), run / FINAL_WEIGHTS_NAME)
