"""The process group as Accelerate/torchrun/SLURM set it up, and the few collectives the pipeline needs."""
from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from accelerate import PartialState

from vwe.runtime.errors import VweError


def use_cpu() -> bool:
    """No GPU, or the launcher forced the CPU (ACCELERATE_USE_CPU, which PartialState itself ignores)."""
    forced = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return forced or not torch.cuda.is_available()


# Modules that, imported for the first time while a process group exists, keep that group referenced
# past destroy_process_group: torch._dynamo (torchvision imports it) and DeepSpeed (Accelerate imports it
# lazily, e.g. in unwrap_model). The group's gloo threads then live on into interpreter shutdown and
# abort the process there ("terminate called without an active exception"; 3 of 28 two-process
# `vwe evaluate` runs). tests/test_dist.py holds the check.
GROUP_CAPTURING_MODULES = ("torch._dynamo", "deepspeed")


def import_before_group() -> None:
    """Import GROUP_CAPTURING_MODULES (those installed) before a process group forms."""
    for name in GROUP_CAPTURING_MODULES:
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name)


def distributed_state(**kwargs: Any) -> PartialState:
    """Join the process group described by the environment (world size 1 when there is none).

    Without a GPU Accelerate must be told it runs on CPU, or each launched process believes it is alone.
    `kwargs` go to PartialState (e.g. `timeout`).
    """
    import_before_group()
    return PartialState(cpu=use_cpu(), **kwargs)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def sum_over_ranks(x: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """Elementwise sum over all ranks. A NumPy array gives a new array (int64/float64 exact, the input
    untouched); a tensor is reduced in place on its device and returned. Unchanged in a single process."""
    if isinstance(x, torch.Tensor):
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(x, op=dist.ReduceOp.SUM)
        return x
    if not is_distributed():
        return x.copy()
    dtype = torch.int64 if np.issubdtype(x.dtype, np.integer) else torch.float64
    t = torch.from_numpy(np.ascontiguousarray(x)).to(dtype)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu().numpy().astype(x.dtype)


def gather_objects(obj: Any) -> list:
    """Every rank's `obj` (small, picklable), in rank order, on every rank."""
    if not is_distributed():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def collective_call(fn: Callable[[], Any], main_only: bool = False) -> Any:
    """Run `fn` on every rank (or only rank 0) and let all ranks agree on the outcome.

    A VweError or OSError raised on any rank is raised on every rank (the first one, by rank), so no rank
    is left waiting in a collective for a peer that failed. Returns rank 0's result on every rank.
    """
    rank = dist.get_rank() if is_distributed() else 0
    result, error = None, None
    if rank == 0 or not main_only:
        try:
            result = fn()
        except (VweError, OSError) as e:
            error = e
    outcomes = gather_objects((result if rank == 0 else None, error))
    for _, err in outcomes:
        if err is not None:
            raise err
    return outcomes[0][0]
