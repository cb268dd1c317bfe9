"""Shared fixtures. Under CI (VWE_REQUIRE_ALL=1) a skipped multi-process or SLURM test is a failure."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
REQUIRE_ALL = os.environ.get("VWE_REQUIRE_ALL") == "1"
STRICT_MARKERS = ("multiprocess", "slurm")

# Subprocesses (python -m vwe, accelerate launch, srun) import the package from this checkout.
os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if REQUIRE_ALL and report.skipped and any(item.get_closest_marker(m) for m in STRICT_MARKERS):
        report.outcome = "failed"
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
        report.longrepr = f"skipped under VWE_REQUIRE_ALL=1 (multi-process/SLURM tests must run): {reason}"


def run_vwe(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 600,
            check: bool = True) -> subprocess.CompletedProcess:
    """Run `python -m vwe ARGS` as a real process; on failure show its output."""
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "vwe", *args], cwd=cwd, env=full_env, text=True,
                          capture_output=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"vwe {' '.join(args)} exited {proc.returncode}\n--- stdout\n{proc.stdout}"
                             f"\n--- stderr\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def synthetic_shards(tmp_path_factory) -> Path:
    """A small synthetic VOC-style data set converted to shards (train 48, val 12, 64-80 px)."""
    from vwe.data.prepare import prepare
    from vwe.data.synthetic import write_dataset
    root = tmp_path_factory.mktemp("synthetic")
    write_dataset(root / "voc", n_train=48, n_val=12, seed=0, size=80, sbd=False)
    prepare(root / "voc", None, root / "shards", shard_size=10)
    return root / "shards"


# Overrides that shrink configs/demo.yaml to a few seconds per run on a 2-core CPU.
TINY = ["data.crop_size=64", "data.long_side=[64, 80]", "data.num_workers=1", "data.shuffle_buffer=16",
        "model.num_words=16", "train.batch_size=4", "train.log_every=1", "infer.scales=[1.0, 0.5]",
        "infer.batch_size=2", "infer.num_workers=1", "output.tensorboard=false"]


def launch_cmd(processes: int, *vwe_args: str, launch_config: str = "launch/cpu.yaml") -> list[str]:
    """`python -m vwe ...` for one process; `accelerate launch` over `processes` CPU processes otherwise."""
    if processes == 1:
        return [sys.executable, "-m", "vwe", *vwe_args]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / launch_config),
            "--num_processes", str(processes), "-m", "vwe", *vwe_args]


def kill_tree(pid: int, sig: int = 9) -> None:
    """Send `sig` to a process and every descendant (torchrun starts its workers in new sessions, so a
    process-group kill would miss them)."""
    import psutil
    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    procs = [root, *root.children(recursive=True)]
    for p in procs:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass
    # the root is the caller's child: leave reaping it to the caller's Popen (psutil would take its status)
    psutil.wait_procs(procs[1:], timeout=30)
