"""The pace figures of the benchmarks (vwe/bench/launches.py) on the CPU: every dispatched op is counted."""
from __future__ import annotations

import torch

from vwe.bench.launches import pace_note, step_launches


def test_step_launches_counts_each_dispatched_op():
    x = torch.randn(4, 4, requires_grad=True)

    def step():
        (x * 2).relu().sum().backward()

    # mul, relu, the detach autograd makes to save relu's output for its backward, sum
    forward_only = step_launches(lambda: (x * 2).relu().sum(), torch.device("cpu"))
    assert forward_only == {"ops_per_step": 4, "kernels_per_step": None, "kernel_s_per_step": None}
    assert step_launches(step, torch.device("cpu"), compiled=True)["ops_per_step"] is None
    assert step_launches(step, torch.device("cpu"))["ops_per_step"] > 3
    cpu = {"ops_per_step": 1000, "kernels_per_step": None, "kernel_s_per_step": None}
    assert pace_note(cpu, 0.05) == "1000 ops/step (50.0 us of wall time per op)"
    gpu = {"ops_per_step": None, "kernels_per_step": 800, "kernel_s_per_step": 0.01}
    assert pace_note(gpu, 0.05) == "800 GPU kernels/step, GPU busy 20% of the step's wall time"
    assert pace_note(gpu, 0.05, "image") == "800 GPU kernels/image, GPU busy 20% of the image's wall time"
