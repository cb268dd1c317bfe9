"""What one network's training is made of. The Trainer, its checkpoint manager, logger, preemption and
resume are the same for every network (docs/architecture.md); a Recipe says only what differs: the
network, its optimizer groups and schedule, its loss, its batches, and which config sections decide what
it computes. `CamRecipe` is the CAM network's (docs/method.md); the segmentation and relation networks
bring theirs (vwe/stages/segment.py, vwe/stages/irn.py)."""
from __future__ import annotations

import warnings
from collections.abc import Iterator

import torch
from torch import nn

from vwe.data.loader import train_batches
from vwe.formats.config import Config, ModelConfig
from vwe.nets.cam import build_model, param_groups
from vwe.runtime.skips import SkipPolicy
from vwe.runtime.errors import ConfigError


class Recipe:
    """The network-specific part of a training run; the defaults are the CAM network's."""
    command = "vwe train"                     # the run lock's holder and messages
    sections: tuple[str, ...] = ("data", "model", "train")  # config sections a resume compares
    neutral: frozenset[str] = frozenset()     # keys of those sections that do not change the result
    schedule_every = 1                        # optimizer steps between learning-rate updates

    def check(self, cfg: Config, world: int) -> None:
        """Refusals that need no model yet (before anything is built or written); `world` processes."""

    def build(self, cfg: Config, model_cfg: ModelConfig) -> nn.Module:
        raise NotImplementedError

    def param_groups(self, model: nn.Module, cfg: Config) -> list[dict]:
        raise NotImplementedError

    def losses(self, net: nn.Module, out, batch: dict, device: torch.device) -> dict[str, torch.Tensor]:
        """The loss terms of a forward's output (`loss`: what is minimised), float32."""
        raise NotImplementedError

    def batches(self, cfg: Config, rank: int, world: int, epoch: int, start_batch: int,
                skips: SkipPolicy) -> Iterator[dict]:
        """This rank's micro-batches from micro-batch `start_batch` of `epoch` on, through every later epoch
        without end, from one set of loader workers (uint8 `image`, `key`, targets)."""
        return train_batches(cfg.data, cfg.train, rank, world, epoch, start_batch, epochs=None, skips=skips)


class CamRecipe(Recipe):
    """The visual-word CAM network on image-level labels (docs/method.md)."""

    def check(self, cfg: Config, world: int) -> None:
        check_pyramid_fits(cfg)
        if cfg.model.codebook == "memory" and cfg.train.grad_accum > 1:
            warnings.warn(f"model.codebook=memory with train.grad_accum={cfg.train.grad_accum}: the memory bank "
                          f"is updated after every micro-batch ({cfg.train.grad_accum} updates per optimizer step); "
                          f"the published code updates it once per step over the whole batch (docs/method.md)",
                          stacklevel=2)

    def build(self, cfg: Config, model_cfg: ModelConfig) -> nn.Module:
        return build_model(model_cfg)

    def param_groups(self, model: nn.Module, cfg: Config) -> list[dict]:
        return param_groups(model, cfg.train.lr, cfg.train.head_lr_mult, cfg.train.weight_decay)

    def losses(self, net: nn.Module, out, batch: dict, device: torch.device) -> dict[str, torch.Tensor]:
        return net.losses(out, batch["labels"].to(device, non_blocking=True))


def check_pyramid_fits(cfg: Config) -> None:
    """The training crop's feature map (ceil(crop / 16) at output stride 16) must hold the largest HSPP
    level: refused here, before anything is written, rather than at the first forward."""
    side = -(-cfg.data.crop_size // 16)
    top = max(cfg.model.pool_levels)
    if cfg.model.pooling == "hspp" and side < top:
        raise ConfigError(f"model.pool_levels={cfg.model.pool_levels}: the largest level ({top}) does not fit the "
                          f"{side}x{side} feature map of a data.crop_size={cfg.data.crop_size} crop (output stride "
                          f"16); use data.crop_size >= {16 * (top - 1) + 1} or smaller levels")
