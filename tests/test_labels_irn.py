"""IRNet's label math (vwe/labels): the path index, boundary -> affinity, the random walk and the
confident-region labels, each required equal to a deliberately naive re-statement of IRNet's function.

The re-statements below (`naive_*`) follow IRNet's code (github jiwoon-ahn/irn: misc/indexing.py,
step/make_sem_seg_labels.py, step/cam_to_ir_label.py, misc/imutils.py) step by step with plain loops and
NumPy, written from reading it, not copied: the same enumeration order, the same padding, the same dense
matrix built entry by entry, the same CRF call. docs/irnet.md says what was compared and to what
tolerance.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vwe.labels.confident import (CONF_BG_THRES, CONF_FG_THRES, cam_to_ir_label, combine_confident, label_unary,
                                  threshold_argmax)
from vwe.labels.pathindex import direction_path, path_index, search_directions, search_paths
from vwe.labels.randomwalk import (dense_affinity, edge_to_affinity, random_walk, sem_seg_labels,
                                   transition_matrix)


# ------------------------------------------------------------------------ naive re-statements of IRNet

def naive_search_paths(radius):
    """indexing.PathIndex.get_search_paths_dst: directions enumerated row by row, each path the box
    pixels with squared line distance < 1 (as a float division, as IRNet), sorted by -(|y|+|x|) with a
    stable sort, grouped by path length in increasing length."""
    by_length = [[] for _ in range(radius * 4)]
    dirs = []
    for x in range(1, radius):
        dirs.append((0, x))
    for y in range(1, radius):
        for x in range(-radius + 1, radius):
            if x * x + y * y < radius ** 2:
                dirs.append((y, x))
    for dy, dx in dirs:
        length_sq = dy ** 2 + dx ** 2
        coords = []
        for y in range(min(0, dy), max(0, dy) + 1):
            for x in range(min(0, dx), max(0, dx) + 1):
                if (dy * x - dx * y) ** 2 / length_sq < 1:
                    coords.append([y, x])
        coords.sort(key=lambda c: -abs(c[0]) - abs(c[1]))
        by_length[len(coords)].append(coords)
    return [np.asarray(v) for v in by_length if v]


def naive_path_indices(radius, size):
    """indexing.PathIndex.get_path_indices: for every group, direction and path pixel, the flat indices
    of the shifted source block; src = the block itself; dst = every path's first pixel."""
    rf = int(np.ceil(radius) - 1)
    full = np.arange(size[0] * size[1]).reshape(size)
    ch, cw = size[0] - rf, size[1] - 2 * rf
    out = []
    for paths in naive_search_paths(radius):
        group = []
        for p in paths:
            group.append([full[dy:dy + ch, rf + dx:rf + dx + cw].reshape(-1) for dy, dx in p])
        out.append(np.array(group))
    src = full[:ch, rf:rf + cw].reshape(-1)
    dst = np.concatenate([p[:, 0] for p in out])
    return out, src, dst


def naive_edge_to_affinity(edge, paths):
    """indexing.edge_to_affinity for one map: per group, direction and source, 1 - max over the path."""
    flat = edge.reshape(-1)
    rows = []
    for ind in paths:
        n, length, s = ind.shape
        for d in range(n):
            rows.append([1 - max(flat[ind[d, l, j]] for l in range(length)) for j in range(s)])
    return np.array(rows)


def naive_propagate(cams, edge, radius=5, beta=10, exp_times=8):
    """indexing.propagate_to_edge in float64 NumPy: pad the boundary map with 1.0 (left, right, bottom),
    path index of the padded grid, sparse affinities, a dense padded matrix of (src, dst), identity and
    (dst, src) entries accumulated (torch.sparse(...).to_dense() sums duplicates), cropped to the map,
    affinity ** beta divided by its column sums, squared exp_times times, (cam * (1 - edge)) @ T."""
    k, h, w = cams.shape
    hp, wp = h + radius, w + 2 * radius
    padded = np.pad(edge, ((0, radius), (radius, radius)), constant_values=1.0)
    paths, src, dst = naive_path_indices(radius, (hp, wp))
    sparse = naive_edge_to_affinity(padded, paths)
    n = hp * wp
    dense = np.zeros((n, n))
    for d in range(dst.shape[0]):
        for j in range(src.shape[0]):
            dense[src[j], dst[d, j]] += sparse[d, j]
            dense[dst[d, j], src[j]] += sparse[d, j]
    for i in range(n):
        dense[i, i] += 1
    dense = dense.reshape(hp, wp, hp, wp)[:-radius, radius:-radius, :-radius, radius:-radius].reshape(h * w, h * w)
    trans = dense ** beta
    trans = trans / trans.sum(axis=0, keepdims=True)
    for _ in range(exp_times):
        trans = trans @ trans
    x = (cams * (1 - edge)[None]).reshape(k, h * w)
    return (x @ trans).reshape(k, h, w)


def naive_sem_seg(cams, edge, keys, size, bg_thres=0.25):
    """make_sem_seg_labels._work after the model: walk, x4 bilinear upsampling, crop, divide by the max,
    constant background channel in front, argmax, keys lookup."""
    rw = torch.from_numpy(naive_propagate(cams, edge))[:, None]
    up = F.interpolate(rw, scale_factor=4, mode="bilinear", align_corners=False)[:, 0, :size[0], :size[1]].numpy()
    up = up / up.max()
    scores = np.concatenate([np.full((1,) + up.shape[1:], bg_thres), up])
    lut = np.pad(np.asarray(keys) + 1, (1, 0))
    out = np.zeros(size, np.int64)
    for y in range(size[0]):
        for x in range(size[1]):
            out[y, x] = lut[int(np.argmax(scores[:, y, x]))]
    return out


def naive_cam_to_ir_label(image, high_res, keys, fg=0.30, bg=0.05):
    """cam_to_ir_label._work: per threshold, pad the background channel, argmax, imutils'
    crf_inference_label (pydensecrf, unary_from_labels(zero_unsure=False), Gaussian 3/3, bilateral
    50/5/10, 10 iterations), keys lookup; then conf = fg, 255 where fg is 0, 0 where fg + bg == 0."""
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_labels
    lut = np.pad(np.asarray(keys) + 1, (1, 0))
    h, w = high_res.shape[1:]

    def crf(labels):
        d = dcrf.DenseCRF2D(w, h, len(lut))
        d.setUnaryEnergy(unary_from_labels(labels, len(lut), gt_prob=0.7, zero_unsure=False))
        d.addPairwiseGaussian(sxy=3, compat=3)
        d.addPairwiseBilateral(sxy=50, srgb=5, rgbim=np.ascontiguousarray(np.copy(image)), compat=10)
        return np.argmax(np.array(d.inference(10)).reshape((len(lut), h, w)), axis=0)

    maps = []
    for thres in (fg, bg):
        padded = np.pad(high_res, ((1, 0), (0, 0), (0, 0)), mode="constant", constant_values=thres)
        maps.append(lut[crf(np.argmax(padded, axis=0))])
    fg_conf, bg_conf = maps
    conf = fg_conf.copy()
    conf[fg_conf == 0] = 255
    conf[bg_conf + fg_conf == 0] = 0
    return conf.astype(np.uint8)


# ------------------------------------------------------------------------------------------- path index

@pytest.mark.parametrize("radius,size", [(5, (12, 17)), (10, (21, 24)), (3, (4, 5))])
def test_path_index_equals_irnet(radius, size):
    naive_paths, naive_src, naive_dst = naive_path_indices(radius, size)
    index = path_index(radius, size)
    assert len(index.path_indices) == len(naive_paths)
    for ours, theirs in zip(index.path_indices, naive_paths):
        np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_array_equal(index.src_indices, naive_src)
    np.testing.assert_array_equal(index.dst_indices, naive_dst)
    np.testing.assert_array_equal(index.directions, np.concatenate([p[:, 0] for p in naive_search_paths(radius)]))


def test_search_paths_geometry():
    groups = search_paths(10)
    dirs = np.concatenate([g[:, 0] for g in groups])
    assert len(dirs) == len(search_directions(10)) == 152
    assert sorted(map(tuple, dirs.tolist())) == sorted(map(tuple, search_directions(10).tolist()))
    assert all((d ** 2).sum() < 100 and (d[0] > 0 or (d[0] == 0 and d[1] > 0)) for d in dirs)
    for g in groups:
        assert (g[:, -1] == 0).all()  # the source ends every path
    assert [len(g[0]) for g in groups] == sorted(len(g[0]) for g in groups)
    np.testing.assert_array_equal(direction_path(0, 3), [[0, 3], [0, 2], [0, 1], [0, 0]])


def test_path_index_cached_and_readonly():
    a, b = path_index(5, (10, 12)), path_index(5, (10, 12))
    assert a is b
    with pytest.raises(ValueError):
        a.src_indices[0] = 1
    with pytest.raises(ValueError, match="too small"):
        path_index(10, (8, 30))


# ---------------------------------------------------------------------------------------- affinities

def test_edge_to_affinity_equals_irnet():
    rng = np.random.default_rng(0)
    edge = rng.random((2, 13, 18))
    index = path_index(5, (13, 18))
    ours = edge_to_affinity(torch.from_numpy(edge), index).numpy()
    paths, _, _ = naive_path_indices(5, (13, 18))
    for b in range(2):
        np.testing.assert_array_equal(ours[b], naive_edge_to_affinity(edge[b], paths))
    # (B, 1, H, W) is accepted as well
    np.testing.assert_array_equal(edge_to_affinity(torch.from_numpy(edge)[:, None], index).numpy(), ours)


def test_dense_affinity_properties():
    rng = np.random.default_rng(1)
    edge = torch.from_numpy(rng.random((6, 7)))
    dense = dense_affinity(edge, 5).numpy()
    np.testing.assert_array_equal(dense, dense.T)
    np.testing.assert_array_equal(np.diag(dense), 1)
    # pixel (0,0) and (0,1): path = both pixels
    assert dense[0, 1] == pytest.approx(1 - max(edge[0, 0], edge[0, 1]).item())
    # pixels 5 apart are outside the radius
    assert dense[0, 5] == 0 and dense[0, 5 * 7] == 0


def test_transition_matrix_is_column_stochastic():
    rng = np.random.default_rng(2)
    a = rng.random((9, 9))
    a = torch.from_numpy((a + a.T) / 2)
    t = transition_matrix(a, beta=10, exp_times=3)
    np.testing.assert_allclose(t.sum(0).numpy(), 1, atol=1e-12)
    t1 = a ** 10 / (a ** 10).sum(0, keepdim=True)
    np.testing.assert_allclose(t.numpy(), torch.linalg.matrix_power(t1, 8).numpy(), atol=1e-12)


@pytest.mark.parametrize("h,w", [(5, 6), (7, 4)])
def test_random_walk_equals_irnet(h, w):
    rng = np.random.default_rng(h * 10 + w)
    cams = rng.random((3, h, w))
    edge = rng.random((h, w)) ** 3  # mostly low boundary scores, as trained maps are
    expected = naive_propagate(cams, edge)
    ours64 = random_walk(torch.from_numpy(cams), torch.from_numpy(edge)).numpy()
    np.testing.assert_allclose(ours64, expected, rtol=1e-9, atol=1e-12)
    ours32 = random_walk(torch.from_numpy(cams).float(), torch.from_numpy(edge).float()).numpy()
    np.testing.assert_allclose(ours32, expected, rtol=1e-4, atol=1e-6)


def test_sem_seg_labels_equal_irnet():
    rng = np.random.default_rng(3)
    size = (22, 19)
    h, w = math.ceil(size[0] / 4), math.ceil(size[1] / 4)
    keys = np.array([4, 14])
    cams = rng.random((2, h, w))
    cams[0, :, : w // 2] *= 0.1
    edge = rng.random((h, w)) ** 3
    expected = naive_sem_seg(cams, edge, keys, size)
    ours = sem_seg_labels(torch.from_numpy(edge), torch.from_numpy(cams), keys, size)
    assert ours.dtype == np.uint8 and ours.shape == size
    np.testing.assert_array_equal(ours, expected)
    assert set(np.unique(ours)) <= {0, 5, 15}
    # float32 tensors, as vwe's CAM files hold: the same labels
    ours32 = sem_seg_labels(torch.from_numpy(edge).float(), torch.from_numpy(cams).float(), keys, size)
    assert (ours32 != expected).mean() < 1e-3
    assert (sem_seg_labels(torch.from_numpy(edge), torch.zeros(0, h, w, dtype=torch.float64), np.zeros(0), size)
            == 0).all()
    # all-zero CAMs: background (IRNet's 0 / 0 would label every pixel with the first class)
    assert (sem_seg_labels(torch.from_numpy(edge), torch.zeros(2, h, w, dtype=torch.float64), keys, size) == 0).all()


def test_random_walk_spreads_within_regions():
    """A closed boundary keeps the walk inside: a CAM peak inside a box fills the box, not the outside."""
    h = w = 12
    edge = torch.zeros(h, w)
    edge[2, 2:10] = edge[9, 2:10] = 1
    edge[2:10, 2] = edge[2:10, 9] = 1
    cams = torch.zeros(1, h, w)
    cams[0, 5, 5] = 1
    rw = random_walk(cams, edge)[0]
    inside = rw[3:9, 3:9]
    assert inside.min() > 0
    assert rw[0, 0] < 1e-3 * inside.min()


# ------------------------------------------------------------------------------------- confident labels

def test_label_unary_equals_pydensecrf():
    from pydensecrf.utils import unary_from_labels
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 4, (9, 11))
    np.testing.assert_array_equal(label_unary(labels, 4, 0.7), unary_from_labels(labels, 4, 0.7, zero_unsure=False))


def test_threshold_and_combination():
    high_res = np.array([[[0.2, 0.4, 0.04, 0.9]], [[0.1, 0.5, 0.01, 0.1]]], np.float32)
    np.testing.assert_array_equal(threshold_argmax(high_res, 0.3), [[0, 2, 0, 1]])
    np.testing.assert_array_equal(threshold_argmax(high_res, 0.05), [[1, 2, 0, 1]])
    fg = np.array([[0, 0, 3, 3]])
    bg = np.array([[0, 5, 0, 3]])
    np.testing.assert_array_equal(combine_confident(fg, bg), [[0, 255, 3, 3]])


def test_cam_to_ir_label_equals_irnet():
    rng = np.random.default_rng(5)
    h, w = 40, 52
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    image[8:30, 10:35] = (200, 40, 40)
    high_res = (rng.random((2, h, w)) * 0.2).astype(np.float32)
    high_res[0, 8:30, 10:35] += 0.7
    high_res[1, 0:10, 40:52] += 0.2
    keys = np.array([6, 11])
    expected = naive_cam_to_ir_label(image, high_res, keys)
    ours = cam_to_ir_label(image, high_res, keys)
    assert ours.dtype == np.uint8
    np.testing.assert_array_equal(ours, expected)
    assert {0, 7, 255} <= set(np.unique(ours).tolist())
    assert CONF_FG_THRES == 0.30 and CONF_BG_THRES == 0.05
    np.testing.assert_array_equal(cam_to_ir_label(image, high_res[:0], keys[:0]), np.zeros((h, w), np.uint8))
    with pytest.raises(ValueError, match="does not match"):
        cam_to_ir_label(image[:-1], high_res, keys)
