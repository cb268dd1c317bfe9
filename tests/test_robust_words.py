"""encode_words computes in at least float32: half is promoted, double stays double (issue 10, item 7)."""
import torch
import torch.nn.functional as F

from vwe.nets.words import encode_words


def test_double_inputs_keep_double_precision():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(2, 8, 5, 6, dtype=torch.float64, generator=g)
    book = torch.randn(7, 8, dtype=torch.float64, generator=g)
    a, hist, labels = encode_words(feats, book)
    assert a.dtype == hist.dtype == torch.float64
    expected = torch.einsum("bdhw,kd->bkhw", F.normalize(feats, dim=1), F.normalize(book, dim=1)).softmax(1)
    torch.testing.assert_close(a, expected, rtol=1e-12, atol=1e-14)  # float32 would be off by ~1e-8
    torch.testing.assert_close(hist, expected.sum((2, 3), keepdim=True), rtol=1e-12, atol=1e-12)


def test_half_inputs_are_computed_in_float32():
    feats = torch.randn(1, 8, 3, 3).half()
    book = torch.randn(4, 8).half()
    a, hist, _ = encode_words(feats, book)
    assert a.dtype == hist.dtype == torch.float32
    mixed, _, _ = encode_words(feats.double(), book)  # a double side wins
    assert mixed.dtype == torch.float64
