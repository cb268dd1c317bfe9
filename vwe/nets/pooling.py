"""Hybrid spatial pyramid pooling (HSPP, docs/method.md): global average mixed with pyramid max-pool averages."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from vwe.runtime.errors import VweError


def hybrid_pyramid_pool(x: torch.Tensor, levels: Sequence[int] = (1, 2, 4), gamma: float = 2.0) -> torch.Tensor:
    """(B, C, h, w) -> (B, C, 1, 1).

    (gamma * GAP(x) + sum_l GAP(maxpool(x, kernel=(h//l, w//l), stride=kernel))) / (gamma + len(levels)).
    Cells that do not fit the floor-divided grid are dropped, as a max pool without padding does.
    """
    if x.dim() != 4:
        raise ValueError(f"hybrid_pyramid_pool expects a (B, C, h, w) tensor, got shape {tuple(x.shape)}")
    if not levels or any(int(l) < 1 for l in levels):
        raise ValueError(f"pyramid levels must be positive integers, got {list(levels)}")
    h, w = x.shape[-2:]
    top = max(levels)
    if h < top or w < top:
        raise VweError(f"feature map {h}x{w} is smaller than the largest pyramid level {top} "
                       f"(model.pool_levels={list(levels)}); use larger inputs (data.crop_size, at output "
                       f"stride 16 the map is ceil(size/16)) or smaller levels")
    out = gamma * x.mean(dim=(2, 3), keepdim=True)
    for level in levels:
        kernel = (h // level, w // level)
        out = out + F.max_pool2d(x, kernel_size=kernel, stride=kernel).mean(dim=(2, 3), keepdim=True)
    return out / (gamma + len(levels))
