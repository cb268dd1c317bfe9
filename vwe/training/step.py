"""One training micro-step, shared by the training loop and `vwe bench train`."""
from __future__ import annotations

import time
from collections.abc import Callable

import torch

from vwe.data.transforms import normalize
from vwe.runtime.device import synchronize
from vwe.training.setup import Parts


def micro_step(parts: Parts, batch: dict, mark: Callable[[str], None] | None = None) -> dict[str, torch.Tensor]:
    """Forward, loss, backward and (on an accumulation boundary) the SGD update and schedule step.

    `batch` holds uint8 images (B, 3, H, W) and what the recipe's loss needs; returns the loss terms. `mark(phase)`,
    when given, is called after each phase ("forward", "backward", "optimizer") with the device synced.
    """
    acc = parts.accelerator
    with acc.accumulate(parts.engine):
        # DeepSpeed runs bf16/fp16 by casting the weights: inputs take their dtype (input_dtype)
        images = normalize(batch["image"].to(parts.device, non_blocking=True)).to(parts.input_dtype)
        if parts.model_cfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with acc.autocast():
            out = parts.engine(images)
        losses = parts.recipe.losses(parts.net, out, batch, parts.device)
        _mark(mark, "forward", parts)
        acc.backward(losses["loss"])
        _mark(mark, "backward", parts)
        parts.optimizer.step()
        if acc.sync_gradients:
            parts.scheduler.step()
        parts.optimizer.zero_grad(set_to_none=True)
        _mark(mark, "optimizer", parts)
    return losses


def _mark(mark: Callable[[str], None] | None, phase: str, parts: Parts) -> None:
    if mark is not None:
        synchronize(parts.device)
        mark(phase)


class PhaseTimer:
    """Seconds per phase of each step, for `micro_step(..., mark=timer.mark)` after `timer.start()`."""

    def __init__(self) -> None:
        self.times: dict[str, list[float]] = {"forward": [], "backward": [], "optimizer": []}
        self._t = 0.0

    def start(self) -> None:
        self._t = time.perf_counter()

    def mark(self, phase: str) -> None:
        now = time.perf_counter()
        self.times[phase].append(now - self._t)
        self._t = now

    def mean(self, phase: str) -> float:
        values = self.times[phase]
        return sum(values) / len(values)
