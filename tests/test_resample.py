"""The device resize (vwe/data/resample.py) equals torch's CPU uint8 antialiased resize bit for bit: the
loader's `resize_uint8`, which inference's `infer.resize_on: device` replaces on a GPU."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from vwe.data.resample import axis_weights, resize_exact
from vwe.data.transforms import resize_pair, resize_uint8, scaled_size, to_tensor
from vwe.stages.infer import device_scales
from PIL import Image


def _image(rng: np.random.Generator, h: int, w: int, smooth: bool) -> np.ndarray:
    if smooth:  # photo-like: neighbours close, so overshoot and rounding near .5 both occur
        return np.clip(np.cumsum(rng.integers(-9, 10, (h, w, 3)), axis=1) + 128, 0, 255).astype(np.uint8)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("mode", ["bicubic", "bilinear"])
def test_equal_to_torch_uint8_resize_for_many_sizes_and_scales(mode):
    rng = np.random.default_rng(0)
    for trial in range(24):
        h, w = (int(v) for v in rng.integers(3, 300, 2))
        x = to_tensor(Image.fromarray(_image(rng, h, w, smooth=trial % 2 == 1)))  # the loader's channels-last view
        for scale in (0.5, 0.75, 1.0, 1.5, 2.0, 0.3, 1.13):
            size = scaled_size(w, h, scale)
            expected = resize_uint8(x, size, mode)
            got = resize_exact(x, size, mode)
            assert got.shape == expected.shape and torch.equal(got, expected), (h, w, scale, mode)


def test_batches_and_strides_do_not_matter():
    rng = np.random.default_rng(1)
    batch = torch.from_numpy(np.stack([_image(rng, 37, 53, smooth=True) for _ in range(3)])).permute(0, 3, 1, 2)
    one_by_one = torch.cat([resize_uint8(b[None], (74, 40)) for b in batch])
    assert torch.equal(resize_exact(batch, (74, 40)), one_by_one)
    assert torch.equal(resize_exact(batch.contiguous(), (74, 40)), one_by_one)
    assert resize_exact(batch, (37, 53)) is batch  # nothing to do


def test_device_scales_are_the_loaders_scales_with_flips():
    rng = np.random.default_rng(2)
    ims = [Image.fromarray(_image(rng, 45, 61, smooth=True)) for _ in range(2)]
    scales = [1.0, 0.5, 1.5, 2.0]
    made = device_scales(torch.stack([to_tensor(im)[0] for im in ims]), scales, True, "bicubic")
    for s, x in zip(scales, made):
        pairs = [resize_pair(im, s, True) for im in ims]
        assert torch.equal(x, torch.cat([p[0:1] for p in pairs] + [p[1:2] for p in pairs]))
    plain = device_scales(torch.stack([to_tensor(im)[0] for im in ims]), [0.5], False, "bicubic")[0]
    assert torch.equal(plain, torch.cat([resize_pair(im, 0.5, False) for im in ims]))


def test_weights_sum_to_one_in_fixed_point_and_bad_input_is_refused():
    for n_in, n_out in ((500, 250), (375, 750), (7, 3), (3, 7)):
        starts, weights, precision = axis_weights(n_in, n_out)
        assert abs(weights.sum(1) - (1 << precision)).max() <= weights.shape[1]  # rounding of each tap
        assert starts.min() >= 0 and starts.max() < n_in
    with pytest.raises(TypeError, match="uint8"):
        resize_exact(torch.zeros(1, 3, 4, 4), (2, 2))
    with pytest.raises(ValueError, match="resize mode"):
        resize_exact(torch.zeros(1, 3, 4, 4, dtype=torch.uint8), (2, 2), "nearest")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_same_pixels_on_a_gpu():
    rng = np.random.default_rng(3)
    x = to_tensor(Image.fromarray(_image(rng, 375, 500, smooth=True)))
    for scale in (0.5, 1.5, 2.0):
        size = scaled_size(500, 375, scale)
        assert torch.equal(resize_exact(x.cuda(), size).cpu(), resize_uint8(x, size))
