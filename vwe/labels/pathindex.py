"""IRNet's path index (docs/irnet.md, "Path index"): the pixel pairs within a radius on a feature map and,
for each pair, the pixels on the line between them.

A pair is a source pixel and one of the `directions` (dy, dx) with dx^2 + dy^2 < radius^2 in the lower
half-plane (dy > 0, or dy = 0 and dx > 0), so every unordered pair appears once. The path of a direction is
every offset (y, x) in the box spanned by (0, 0) and (dy, dx) whose distance to the line through both is
below one pixel, the destination first. Directions are grouped by path length (shortest first), as IRNet
groups them to gather whole groups at once; `directions` is in that grouped order, the order of the
affinity channels everywhere in vwe.

Sources are the pixels of the map whose every destination lies inside it: rows [0, H - rf), columns
[rf, W - rf) with rf = ceil(radius) - 1.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np
import torch

IRN_RADIUS = 10  # IRNet's train_irn.py: PathIndex(radius=10, ...) for the affinity loss
WALK_RADIUS = 5  # IRNet's propagate_to_edge default, which make_sem_seg_labels uses


def _readonly(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)  # cached and shared between callers
    return a


def search_directions(radius: int) -> np.ndarray:
    """(D, 2) int64 (dy, dx) offsets within `radius` in the lower half-plane, in IRNet's enumeration order
    (dy = 0 row first, then row by row), before the grouping by path length."""
    dirs = [(0, x) for x in range(1, radius)]
    dirs += [(y, x) for y in range(1, radius) for x in range(-radius + 1, radius) if x * x + y * y < radius ** 2]
    return np.asarray(dirs, dtype=np.int64).reshape(-1, 2)


def direction_path(dy: int, dx: int) -> np.ndarray:
    """(L, 2) offsets from (0, 0) to (dy, dx) within one pixel of the line through both, the farthest
    (by |y| + |x|, ties in row-major order) first: the destination is row 0 and the source (0, 0) the last."""
    ys = np.arange(min(0, dy), max(0, dy) + 1)
    xs = np.arange(min(0, dx), max(0, dx) + 1)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    yy, xx = yy.ravel(), xx.ravel()
    # squared distance to the line < 1, in integers: (dy*x - dx*y)^2 < dy^2 + dx^2
    near = (dy * xx - dx * yy) ** 2 < dy * dy + dx * dx
    coords = np.stack([yy[near], xx[near]], axis=1)
    order = np.argsort(-(np.abs(coords[:, 0]) + np.abs(coords[:, 1])), kind="stable")
    return coords[order]


@functools.lru_cache(maxsize=8)
def search_paths(radius: int) -> tuple[np.ndarray, ...]:
    """The paths grouped by length, shortest group first: per group an (n, L, 2) int64 array of offsets,
    directions in enumeration order inside a group."""
    by_length: dict[int, list[np.ndarray]] = {}
    for dy, dx in search_directions(radius):
        path = direction_path(int(dy), int(dx))
        by_length.setdefault(len(path), []).append(path)
    return tuple(_readonly(np.stack(by_length[n])) for n in sorted(by_length))


@dataclass(frozen=True)
class PathIndex:
    """Flat (row-major) pixel indices of every pair and path on an H x W map. S = number of sources."""
    radius: int
    size: tuple[int, int]
    directions: np.ndarray                  # (D, 2) (dy, dx), grouped order
    path_indices: tuple[np.ndarray, ...]    # per path-length group: (n, L, S); [:, 0] destinations
    src_indices: np.ndarray                 # (S,)
    dst_indices: np.ndarray                 # (D, S)
    _on_device: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def radius_floor(self) -> int:
        return radius_floor(self.radius)

    @property
    def source_shape(self) -> tuple[int, int]:
        """(rows, columns) of the source block: (H - rf, W - 2 rf)."""
        rf = self.radius_floor
        return self.size[0] - rf, self.size[1] - 2 * rf

    def paths_on(self, device: torch.device | str) -> tuple[torch.Tensor, ...]:
        """`path_indices` as int64 tensors on `device` (made once per device)."""
        key = str(torch.device(device))
        if key not in self._on_device:
            self._on_device[key] = tuple(torch.tensor(p, device=device) for p in self.path_indices)
        return self._on_device[key]


def radius_floor(radius: int) -> int:
    """IRNet's margin: ceil(radius) - 1, the largest |offset| of a direction."""
    return int(math.ceil(radius)) - 1


@functools.lru_cache(maxsize=16)
def path_index(radius: int, size: tuple[int, int]) -> PathIndex:
    """The path index of an H x W map (IRNet's PathIndex(radius, default_size=size)); cached per
    (radius, size), arrays read-only."""
    h, w = int(size[0]), int(size[1])
    rf = radius_floor(radius)
    ch, cw = h - rf, w - 2 * rf
    if ch < 1 or cw < 1:
        raise ValueError(f"a {h}x{w} map is too small for radius {radius}: no pixel has all its pairs inside")
    src = (np.arange(ch)[:, None] * w + np.arange(rf, rf + cw)[None, :]).ravel()
    groups = search_paths(radius)
    paths = tuple(_readonly((p[..., 0] * w + p[..., 1])[..., None] + src[None, None, :]) for p in groups)
    directions = np.concatenate([g[:, 0] for g in groups])
    dst = np.concatenate([p[:, 0] for p in paths])
    return PathIndex(radius, (h, w), _readonly(directions), paths, _readonly(src), _readonly(dst))
