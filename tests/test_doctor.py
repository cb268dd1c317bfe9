"""`vwe doctor` as real processes: one process, two under accelerate launch, under slurm/launch.sh
(outside SLURM), the timeout when a rank never joins, and the preemption exit code."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.conftest import run_vwe

HOLDING = re.compile(r"vwe doctor: rank=\d+ holding for up to")
RANK_LINE = re.compile(r"vwe doctor: rank=(\d+) local_rank=(\d+) world=(\d+) .* backend=(\S+)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_single_process():
    out = run_vwe("doctor", "--timeout", "60").stdout
    assert RANK_LINE.findall(out) == [("0", "0", "1", "none")]
    assert "vwe doctor: world 1 ok" in out


def test_bad_timeout_is_a_clear_error():
    proc = run_vwe("doctor", "--timeout", "0", check=False)
    assert proc.returncode == 2
    assert "--timeout must be positive" in proc.stderr


def test_missing_rank_times_out():
    """A world of 2 where rank 1 never starts: rank 0 gives up after --timeout with a message."""
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    proc = run_vwe("doctor", "--timeout", "4", env=env, check=False, timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert "rank 0 timed out after 4 s while joining the process group" in proc.stderr
    assert "WORLD_SIZE=2" in proc.stderr


@pytest.mark.multiprocess
def test_accelerate_launch_two_cpu_processes(repo):
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                           str(repo / "launch" / "cpu.yaml"), "--num_processes", "2",
                           "--main_process_port", str(_free_port()), "-m", "vwe", "doctor", "--timeout", "120"],
                          text=True, capture_output=True, timeout=300, cwd=repo)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = sorted(RANK_LINE.findall(proc.stdout))
    assert lines == [("0", "0", "2", "gloo"), ("1", "1", "2", "gloo")], proc.stdout
    assert "vwe doctor: world 2 ok: backend gloo" in proc.stdout


@pytest.mark.multiprocess
def test_launch_sh_preemption_exit_code(repo, tmp_path):
    """slurm/launch.sh on one machine: 2 ranks hold; SIGUSR1 to the launcher reaches both ranks through
    the accelerate/torchrun agent (which must survive it), they exit 75 and so does launch.sh."""
    env = {**os.environ, "VWE_CPU": "1", "VWE_PROCS_PER_NODE": "2", "VWE_PYTHON": sys.executable,
           "VWE_LOG_DIR": str(tmp_path / "logs"), "VWE_PORT": str(_free_port())}
    for k in ("SLURM_JOB_ID", "SLURM_NODEID", "SLURM_JOB_NODELIST", "SLURM_JOB_NUM_NODES", "SLURM_NNODES"):
        env.pop(k, None)
    log = tmp_path / "out.txt"
    with open(log, "w") as f:
        proc = subprocess.Popen([str(repo / "slurm" / "launch.sh"), "doctor", "--timeout", "120",
                                 "--hold", "120"], env=env, stdout=f, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 150
        while len(HOLDING.findall(log.read_text())) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.3)
        proc.send_signal(signal.SIGUSR1)
        assert proc.wait(timeout=120) == 75, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert "vwe doctor: world 2 ok" in text
    for rank in (0, 1):
        assert f"rank={rank} got SIGUSR1: exiting with the preemption code 75" in text
    assert "launch.sh: node 0: stopped after SIGUSR1 (launcher exit 1): exit 75" in text
    # Per-rank logs outside SLURM: <VWE_LOG_DIR>/local/run0/node0/<run>/attempt_0/<local rank>/
    assert len(list((tmp_path / "logs" / "local" / "run0" / "node0").glob("*/attempt_0/[01]/stdout.log"))) == 2
