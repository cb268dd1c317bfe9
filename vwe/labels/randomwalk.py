"""IRNet's semantic pseudo labels by random walk (docs/irnet.md, "Random walk"): class-boundary map ->
inter-pixel affinities along the path index -> transition matrix -> CAMs propagated -> label map.

Everything runs on the device and in the dtype of the tensors given; NumPy in, NumPy out only at the ends
of `sem_seg_labels`.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from vwe.labels.pathindex import WALK_RADIUS, PathIndex, path_index

BETA = 10               # run_sample.py --beta
EXP_TIMES = 8           # run_sample.py --exp_times: 2^8 steps of the walk
SEM_SEG_BG_THRES = 0.25  # run_sample.py --sem_seg_bg_thres
CAM_STRIDE = 4          # the strided CAMs and the boundary map are at 1/4 of the image


def edge_to_affinity(edge: torch.Tensor, index: PathIndex) -> torch.Tensor:
    """(B, H, W) or (B, 1, H, W) boundary probabilities on `index.size` -> (B, D, S) affinities: for each
    pair, 1 - the largest boundary value on its path (both ends included). D follows `index.directions`,
    S `index.src_indices`."""
    flat = edge.reshape(edge.shape[0], -1)
    if flat.shape[1] != index.size[0] * index.size[1]:
        raise ValueError(f"edge map {tuple(edge.shape[-2:])} does not match the path index size {index.size}")
    out = []
    for ind in index.paths_on(edge.device):
        n, length, s = ind.shape
        on_path = flat.index_select(1, ind.reshape(-1)).view(flat.shape[0], n, length, s)
        out.append(1 - on_path.amax(dim=2))
    return torch.cat(out, dim=1)


def dense_affinity(edge: torch.Tensor, radius: int = WALK_RADIUS) -> torch.Tensor:
    """(h, w) boundary map -> (h*w, h*w) symmetric affinity matrix: 1 on the diagonal, the path affinity
    for the pairs closer than `radius`, 0 elsewhere.

    IRNet pads the map (1.0 on the left, right and bottom) so every pixel is a source, builds the matrix
    on the padded grid and crops it; a path stays inside the box of its two ends, so the pairs inside the
    map never read the padding. Here the pairs are taken from the padded grid's index the same way and
    only those with both ends inside the map are written, which saves the padded (larger) matrix."""
    h, w = edge.shape[-2:]
    hp, wp = h + radius, w + 2 * radius
    index = path_index(radius, (hp, wp))
    padded = F.pad(edge.reshape(1, 1, h, w), (radius, radius, 0, radius), value=1.0)
    aff = edge_to_affinity(padded, index)[0]                                   # (D, S)
    device = edge.device
    src = torch.tensor(index.src_indices, device=device).expand_as(aff)
    dst = torch.tensor(index.dst_indices, device=device)
    inner = torch.full((hp * wp,), -1, dtype=torch.int64, device=device)   # padded flat -> map flat, or -1
    rows = torch.arange(h, device=device)[:, None] * wp + torch.arange(radius, radius + w, device=device)[None, :]
    inner[rows.reshape(-1)] = torch.arange(h * w, device=device)
    i, j = inner[src], inner[dst]
    keep = (i >= 0) & (j >= 0)
    i, j, a = i[keep], j[keep], aff[keep]
    dense = torch.zeros(h * w, h * w, dtype=edge.dtype, device=device)
    dense[i, j] = a
    dense[j, i] = a
    dense.diagonal().fill_(1)
    return dense


def transition_matrix(affinity: torch.Tensor, beta: float = BETA, exp_times: int = EXP_TIMES) -> torch.Tensor:
    """affinity ** beta, each column divided by its sum (column-stochastic), then squared `exp_times`
    times: the 2^exp_times-step transition matrix."""
    scaled = affinity.pow(beta)
    trans = scaled / scaled.sum(dim=0, keepdim=True)
    for _ in range(exp_times):
        trans = trans @ trans
    return trans


def random_walk(cams: torch.Tensor, edge: torch.Tensor, beta: float = BETA, exp_times: int = EXP_TIMES,
                radius: int = WALK_RADIUS) -> torch.Tensor:
    """(k, h, w) strided CAMs and the (h, w) boundary map -> (k, h, w) propagated scores:
    row vector (cam * (1 - edge)) times the transition matrix (IRNet's propagate_to_edge)."""
    k = cams.shape[0]
    h, w = edge.shape[-2:]
    if cams.shape[-2:] != (h, w):
        raise ValueError(f"CAMs {tuple(cams.shape)} and boundary map {tuple(edge.shape)} differ in size")
    trans = transition_matrix(dense_affinity(edge, radius), beta, exp_times)
    x = cams.reshape(k, h, w) * (1 - edge.reshape(1, h, w))
    return (x.reshape(k, h * w) @ trans).reshape(k, h, w)


def sem_seg_labels(edge: torch.Tensor, cams: torch.Tensor, keys: np.ndarray, size: tuple[int, int],
                   beta: float = BETA, exp_times: int = EXP_TIMES, bg_thres: float = SEM_SEG_BG_THRES,
                   radius: int = WALK_RADIUS) -> np.ndarray:
    """IRNet's make_sem_seg_labels for one image: walk the strided CAMs (a CamRecord's `cam`, as a
    tensor on the wanted device) over the boundary map (ceil(H/4), ceil(W/4)), upsample x4 (bilinear,
    align_corners=False), crop to `size` (H, W), divide by the overall maximum, put a constant `bg_thres`
    background channel in front, argmax; channel 0 -> 0, channel i -> keys[i-1] + 1. (H, W) uint8."""
    h, w = size
    keys = np.asarray(keys, dtype=np.int64)
    if len(keys) == 0:  # no positive class: IRNet would fail on the empty maximum; all background
        return np.zeros((h, w), np.uint8)
    rw = random_walk(cams, edge, beta, exp_times, radius)
    up = F.interpolate(rw[:, None], scale_factor=CAM_STRIDE, mode="bilinear", align_corners=False)[:, 0, :h, :w]
    top = up.max()
    if top <= 0:  # every score 0: IRNet's 0/0 would make every pixel the first class; background instead
        return np.zeros((h, w), np.uint8)
    up = up / top
    scores = F.pad(up, (0, 0, 0, 0, 1, 0), value=bg_thres)
    lut = np.concatenate([[0], keys + 1]).astype(np.uint8)
    return lut[scores.argmax(dim=0).cpu().numpy()]
