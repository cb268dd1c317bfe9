"""`vwe doctor`: every rank joins the process group, all-reduces a tensor and reports where it runs.

Works the same under `python -m vwe`, `accelerate launch -m vwe`, slurm/launch.sh and the container
entrypoint: rank and world size come from the environment the launcher set up.
"""
from __future__ import annotations

import datetime
import os
import socket
import sys
import threading
import time

import torch

from vwe.runtime.errors import VweError
from vwe.runtime.preempt import PREEMPT_EXIT_CODE, PreemptionFlag

TIMEOUT_EXIT_CODE = 3


def _say(msg: str, err: bool = False) -> None:
    """One write per line, so lines of ranks sharing a pipe do not interleave."""
    stream = sys.stderr if err else sys.stdout
    stream.write(msg + "\n")
    stream.flush()


def _watchdog(timeout_s: float, what: list[str]) -> threading.Timer:
    """Exit the whole process if the check has not finished in time (a rank that never joins)."""
    def fire() -> None:
        rank = os.environ.get("RANK", "?")
        _say(f"vwe doctor: error: rank {rank} timed out after {timeout_s:g} s while {what[0]} "
              f"(WORLD_SIZE={os.environ.get('WORLD_SIZE', '?')}, MASTER_ADDR={os.environ.get('MASTER_ADDR', '?')}, "
              f"MASTER_PORT={os.environ.get('MASTER_PORT', '?')}); check that every node started and can "
              f"reach the head node", err=True)
        os._exit(TIMEOUT_EXIT_CODE)
    timer = threading.Timer(timeout_s, fire)
    timer.daemon = True
    timer.start()
    return timer


def rank_line(info: dict) -> str:
    """One line describing a rank; key=value pairs so logs can be grepped."""
    return "vwe doctor: " + " ".join(f"{k}={v}" for k, v in info.items())


def _hold(seconds: float, rank: int) -> int:
    """Keep the ranks alive; a preemption signal makes every rank exit with PREEMPT_EXIT_CODE."""
    flag = PreemptionFlag().install()
    _say(f"vwe doctor: rank={rank} holding for up to {seconds:g} s (SIGUSR1/SIGTERM -> exit "
          f"{PREEMPT_EXIT_CODE})")
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not flag.requested:
        time.sleep(0.2)
    flag.restore()
    if flag.requested:
        _say(f"vwe doctor: rank={rank} got {flag.signal.name}: exiting with the preemption code "
              f"{PREEMPT_EXIT_CODE}")
        return PREEMPT_EXIT_CODE
    return 0


def doctor(timeout_s: float, hold_s: float = 0.0) -> int:
    """Check the distributed setup; 0 when every rank joined and the all-reduce gave the right sum."""
    if timeout_s <= 0:
        raise VweError(f"--timeout must be positive, got {timeout_s}")
    stage = ["joining the process group"]
    timer = _watchdog(timeout_s, stage)
    try:
        from vwe.runtime.dist import distributed_state

        state = distributed_state(timeout=datetime.timedelta(seconds=timeout_s))
        rank, world = state.process_index, state.num_processes
        env_world = int(os.environ.get("WORLD_SIZE", "1"))
        if world != env_world:
            _say(f"vwe doctor: error: rank {rank} joined a group of {world} process(es) but the launcher "
                  f"set WORLD_SIZE={env_world} (on CPU the launch config needs use_cpu: true)", err=True)
            return 1
        backend = state.backend or "none"
        device = state.device
        info = {
            "rank": rank, "local_rank": state.local_process_index, "world": world,
            "host": socket.gethostname(), "slurm_node": os.environ.get("SLURMD_NODENAME", "-"),
            "node_id": os.environ.get("SLURM_NODEID", "-"), "backend": backend, "device": str(device),
            "pid": os.getpid(),
        }
        _say(rank_line(info))

        stage[0] = "all-reducing"
        t = torch.tensor([1.0, float(rank)], device=device)
        if world > 1:
            torch.distributed.all_reduce(t)
            gathered: list = [None] * world
            torch.distributed.all_gather_object(gathered, info)
        else:
            gathered = [info]
        expected = [float(world), world * (world - 1) / 2]
        if t.tolist() != expected:
            _say(f"vwe doctor: error: rank {rank}: all-reduce gave {t.tolist()}, expected {expected}", err=True)
            return 1
        if rank == 0:
            hosts = sorted({(g["host"], g["slurm_node"]) for g in gathered})
            nodes = ", ".join(f"{h}" if n == "-" else f"{n}({h})" for h, n in hosts)
            _say(f"vwe doctor: world {world} ok: backend {backend}, {len(hosts)} node(s): {nodes}")
        stage[0] = "finishing"
        timer.cancel()
        code = _hold(hold_s, rank) if hold_s > 0 else 0
        if world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        return code
    finally:
        timer.cancel()
