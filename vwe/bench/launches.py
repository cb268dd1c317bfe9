"""Who sets the pace of a step, the device or the host issuing its work (docs/benchmarks.md).

In eager PyTorch every ATen op the step dispatches costs the host some microseconds (Python, autograd,
autocast, the launch itself), whatever the size of its tensors; a GPU runs a small op's kernel in less.
`step_launches` counts the ops of one step and, on a GPU, sums how long its kernels ran (the CUDA
profiler). A device busy for only part of the step's wall time, at a few microseconds of wall time per
op, is waiting for the host: fewer ops (or CUDA graphs) raise the rate there, a faster GPU would not.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from vwe.runtime.device import synchronize

LAUNCH_STEPS = 2  # the steps step_launches may run (schedules must allow for them): counted, then profiled


class _OpCounter(TorchDispatchMode):
    """Counts the ATen ops dispatched while it is active (views and detaches included: they cost the
    host a dispatch without a kernel)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def step_launches(step: Callable[[], object], device: torch.device, compiled: bool = False) -> dict:
    """Run `step` once counting its dispatched ops (not when `compiled`: the compiler's kernels bypass the
    dispatcher, and a dispatch mode would run the step eagerly), and on a GPU once more under the CUDA
    profiler: {"ops_per_step", "kernels_per_step", "kernel_s_per_step"}, None where not measured. Both
    runs are real steps (an optimizer step changes the weights): call it outside the timed steps."""
    ops = kernels = kernel_s = None
    if not compiled:
        counter = _OpCounter()
        with counter:
            step()
        ops = counter.ops
    if device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile
        synchronize(device)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step()
            synchronize(device)
        events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
        kernels = sum(e.count for e in events)
        kernel_s = sum(e.self_device_time_total for e in events) / 1e6
    return {"ops_per_step": ops, "kernels_per_step": kernels, "kernel_s_per_step": kernel_s}


def pace_note(figures: dict, step_s: float, unit: str = "step") -> str:
    """One line: ops per step (or other `unit` of work) and wall time per op; on a GPU the kernels and the
    share of the wall time the device was busy."""
    ops, kernels, kernel_s = figures["ops_per_step"], figures["kernels_per_step"], figures["kernel_s_per_step"]
    parts = []
    if ops:
        parts.append(f"{ops} ops/{unit} ({1e6 * step_s / ops:.1f} us of wall time per op)")
    if kernels:
        parts.append(f"{kernels} GPU kernels/{unit}, "
                     f"GPU busy {100 * kernel_s / step_s:.0f}% of the {unit}'s wall time")
    return "; ".join(parts) or "pace not measured"
