"""torch's antialiased uint8 resize on any device, with the same output to the last bit.

On the CPU, `F.interpolate(uint8, antialias=True)` (vwe's one image resize, `transforms.resize_uint8`)
runs Pillow's fixed-point algorithm: per axis, filter weights computed in float64, normalised, scaled to
int16 at the largest precision that fits; each output pixel is (sum of weight x pixel + half) >> precision,
clamped to 0..255; the horizontal pass first, on the uint8 image, then the vertical pass on its uint8
result. CUDA has no uint8 path, and its float path differs by up to 8 grey levels (no rounding between the
passes). Here the same integer arithmetic runs as gathers and sums on int32 tensors, so the inference
scales can be made on the GPU from the decoded image and still equal what the loader makes on the CPU.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch

MODES = ("bicubic", "bilinear")


def _cubic(x: float) -> float:
    """Keys' cubic convolution kernel with a = -0.5 (Pillow's and torch's antialiased bicubic)."""
    a, x = -0.5, abs(x)
    if x < 1.0:
        return ((a + 2) * x - (a + 3)) * x * x + 1
    if x < 2.0:
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return 0.0


def _triangle(x: float) -> float:
    return max(0.0, 1.0 - abs(x))


_FILTERS = {"bicubic": (_cubic, 4), "bilinear": (_triangle, 2)}


@functools.lru_cache(maxsize=512)
def axis_weights(in_size: int, out_size: int, mode: str = "bicubic") -> tuple[np.ndarray, np.ndarray, int]:
    """One axis of the resize: (first input index per output [out], int weights [out, taps] (zero past
    each output's own taps), precision in bits), as torch computes them for uint8 with antialiasing."""
    if mode not in MODES:
        raise ValueError(f"resize mode must be one of {MODES}, got {mode!r}")
    fn, interp = _FILTERS[mode]
    scale = in_size / out_size
    support = interp * 0.5 * scale if scale >= 1.0 else interp * 0.5
    taps = int(math.ceil(support)) * 2 + 1
    inv = 1.0 / scale if scale >= 1.0 else 1.0
    starts = np.zeros(out_size, np.int64)
    weights = np.zeros((out_size, taps), np.float64)
    top = 0.0
    for i in range(out_size):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)  # int() truncates toward zero, as the C++ cast
        n = min(max(min(int(center + support + 0.5), in_size) - lo, 0), taps)
        w = [fn((j + lo - center + 0.5) * inv) for j in range(n)]
        total = 0.0
        for v in w:  # summed in order: the float64 total must round as torch's does
            total += v
        if total != 0.0:
            w = [v / total for v in w]
            top = max([top, *w])
        starts[i] = lo
        weights[i, :n] = w
    precision = 0
    while precision < 22 and int(0.5 + top * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    scaled = weights * (1 << precision)
    ints = np.where(scaled < 0, np.trunc(scaled - 0.5), np.trunc(scaled + 0.5)).astype(np.int64)
    return starts, ints, precision


@functools.lru_cache(maxsize=512)
def _taps(in_size: int, out_size: int, mode: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One axis's gather indices [out * taps] (clamped: the weight is 0 past an output's own taps) and int32
    weights [out, taps] on `device`, and the precision. Kept per size pair and device: VOC's sizes recur,
    and a GPU gets them from pinned memory without waiting (a pageable copy would wait for every kernel
    queued before it)."""
    starts, weights, precision = axis_weights(in_size, out_size, mode)
    idx = np.minimum(starts[:, None] + np.arange(weights.shape[1])[None, :], in_size - 1).reshape(-1)
    tensors = [torch.from_numpy(np.ascontiguousarray(a)) for a in (idx, weights.astype(np.int32))]
    if device.type == "cuda":
        tensors = [t.pin_memory().to(device, non_blocking=True) for t in tensors]
    return tensors[0], tensors[1], precision


def _pass(x: torch.Tensor, out_size: int, dim: int, mode: str) -> torch.Tensor:
    """Resize uint8 `x` along `dim` (-1 or -2) to out_size, in torch's fixed point: every tap gathered at
    once, weighted and summed (integer sums: the order cannot change them), a dozen ops whatever the taps."""
    idx, w, precision = _taps(x.shape[dim], out_size, mode, x.device)
    taps = w.shape[1]
    gathered = x.to(torch.int32).index_select(dim, idx)
    if dim == -1:
        acc = (gathered.unflatten(-1, (out_size, taps)) * w).sum(-1, dtype=torch.int32)
    else:
        acc = (gathered.unflatten(-2, (out_size, taps)) * w[:, :, None]).sum(-2, dtype=torch.int32)
    return ((acc + (1 << (precision - 1))) >> precision).clamp_(0, 255).to(torch.uint8)


def resize_exact(x: torch.Tensor, size: tuple[int, int], mode: str = "bicubic") -> torch.Tensor:
    """uint8 (..., H, W) resized to `size` (h, w) with antialiasing, equal to torch's CPU uint8
    `F.interpolate(..., mode, antialias=True)` on any device (the horizontal pass first, as there)."""
    if x.dtype != torch.uint8:
        raise TypeError(f"resize_exact takes uint8 images, got {x.dtype}")
    h, w = size
    if x.shape[-1] != w:
        x = _pass(x, w, -1, mode)
    if x.shape[-2] != h:
        x = _pass(x, h, -2, mode)
    return x
