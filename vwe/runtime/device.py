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


def native_bf16(device: torch.device) -> bool:
    """Whether the device computes bf16 natively: a CUDA device with bf16 support, or a CPU for which
    oneDNN reports native bf16 (AVX512-BF16/AMX). Elsewhere bf16 is emulated (>10x slower on CPU)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_precision(setting: str, device: torch.device) -> str:
    """`auto` -> `bf16` where the device computes it natively, else `no` (fp32); other settings as given."""
    if setting != "auto":
        return setting
    return "bf16" if native_bf16(device) else "no"


def precision_note(setting: str, resolved: str, device: torch.device) -> str:
    """One line saying which precision runs and why, for logs and reports."""
    if setting != "auto":
        return f"precision {resolved} (as configured)"
    why = "computes bf16 natively" if resolved == "bf16" else "has no native bf16"
    kind = torch.cuda.get_device_name(device) if device.type == "cuda" else "this CPU"
    return f"precision auto -> {'bf16' if resolved == 'bf16' else 'fp32'} ({kind} {why})"
