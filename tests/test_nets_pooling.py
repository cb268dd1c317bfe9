"""HSPP against a direct loop implementation of the formula of docs/method.md."""
import pytest
import torch

from vwe.runtime.errors import VweError
from vwe.nets.pooling import hybrid_pyramid_pool


def hspp_loop(x: torch.Tensor, levels, gamma: float) -> torch.Tensor:
    """Cell by cell: each level's grid of (h//l) x (w//l) cells, right/bottom remainder dropped."""
    b, c, h, w = x.shape
    out = torch.zeros(b, c, dtype=torch.float64)
    for bi in range(b):
        for ci in range(c):
            m = x[bi, ci].double()
            total = gamma * m.mean()
            for l in levels:
                kh, kw = h // l, w // l
                maxima = []
                for gi in range(h // kh):
                    for gj in range(w // kw):
                        maxima.append(m[gi * kh:(gi + 1) * kh, gj * kw:(gj + 1) * kw].max())
                total = total + torch.stack(maxima).mean()
            out[bi, ci] = total / (gamma + len(levels))
    return out.view(b, c, 1, 1)


@pytest.mark.parametrize("h,w", [(8, 8), (7, 9), (5, 13), (4, 4), (11, 6)])
@pytest.mark.parametrize("levels,gamma", [((1, 2, 4), 2.0), ((1, 3), 0.5), ((2,), 0.0)])
def test_hspp_matches_loop(h, w, levels, gamma):
    if max(levels) > min(h, w):
        pytest.skip("map smaller than a level: covered by the error test")
    g = torch.Generator().manual_seed(h * 100 + w)
    x = torch.randn(2, 3, h, w, generator=g)
    got = hybrid_pyramid_pool(x, levels, gamma)
    assert got.shape == (2, 3, 1, 1)
    torch.testing.assert_close(got.double(), hspp_loop(x, levels, gamma), rtol=1e-5, atol=1e-6)


def test_hspp_drops_cells_that_do_not_fit():
    # 5 wide at level 2: kernel 2, cells cover columns 0-3; a huge value in column 4 is only seen by
    # the global average and the level-1 max.
    x = torch.zeros(1, 1, 4, 5)
    x[0, 0, 0, 4] = 100.0
    got = hybrid_pyramid_pool(x, (1, 2), gamma=1.0).item()
    expected = (1.0 * 100 / 20 + 100 + 0.0) / 3
    assert got == pytest.approx(expected)


def test_hspp_channels_last_and_grad():
    x = torch.randn(2, 4, 9, 7).contiguous(memory_format=torch.channels_last).requires_grad_()
    y = hybrid_pyramid_pool(x)
    torch.testing.assert_close(y, hybrid_pyramid_pool(x.contiguous()))
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_hspp_map_smaller_than_largest_level():
    with pytest.raises(VweError, match=r"3x5 is smaller than the largest pyramid level 4"):
        hybrid_pyramid_pool(torch.randn(1, 2, 3, 5))
    with pytest.raises(ValueError, match="positive"):
        hybrid_pyramid_pool(torch.randn(1, 2, 8, 8), levels=(0, 2))
