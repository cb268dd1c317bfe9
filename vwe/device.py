"""Device-side helpers shared by training, inference and the benchmarks."""
from __future__ import annotations

import contextlib
import resource

import torch


def autocast(mixed_precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """An autocast context for `no | fp16 | bf16` (a null context for `no`)."""
    if mixed_precision == "no":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def peak_memory_mib(device: torch.device) -> float:
    """GPU: max_memory_allocated; CPU: the process's peak RSS (includes the torch libraries)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
