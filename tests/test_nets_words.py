"""Visual words against naive per-pixel implementations; codebooks; the memory-bank update."""
import math

import pytest
import torch

from vwe.nets.words import (LearnedCodebook, MemoryBankCodebook, assigned_means, decorrelation_loss,
                             encode_words)


def naive_encode(features, codebook):
    """Pixel by pixel, in float64 Python arithmetic."""
    b, d, h, w = features.shape
    k = codebook.shape[0]
    f = features.double()
    v = codebook.double()
    v = v / v.norm(dim=1, keepdim=True)
    assign = torch.zeros(b, k, h, w, dtype=torch.float64)
    labels = torch.zeros(b, k)
    for bi in range(b):
        for i in range(h):
            for j in range(w):
                vec = f[bi, :, i, j]
                vec = vec / vec.norm()
                scores = [float(vec @ v[kk]) for kk in range(k)]
                z = sum(math.exp(s) for s in scores)
                probs = [math.exp(s) / z for s in scores]
                assign[bi, :, i, j] = torch.tensor(probs, dtype=torch.float64)
                labels[bi, max(range(k), key=lambda kk: probs[kk])] = 1.0
    return assign, assign.sum(dim=(2, 3), keepdim=True), labels


def test_encode_words_matches_naive():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(2, 8, 3, 5, generator=g) * 3
    book = torch.randn(6, 8, generator=g)
    a, hist, labels = encode_words(feats, book)
    ra, rh, rl = naive_encode(feats, book)
    assert a.shape == (2, 6, 3, 5) and hist.shape == (2, 6, 1, 1) and labels.shape == (2, 6)
    torch.testing.assert_close(a.double(), ra, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hist.double(), rh, rtol=1e-5, atol=1e-5)
    assert torch.equal(labels, rl)
    assert labels.dtype == torch.float32 and not labels.requires_grad
    # every pixel has one winner: at least one word per image, at most h*w
    assert (labels.sum(1) >= 1).all() and (labels.sum(1) <= 15).all()


def test_word_labels_mark_exactly_the_argmax_words():
    book = torch.eye(4, 3)[:, :3].clone()  # words 0,1,2 = axes; word 3 = zero vector, never wins
    book[3] = torch.tensor([-1.0, -1.0, -1.0])
    feats = torch.zeros(1, 3, 1, 2)
    feats[0, :, 0, 0] = torch.tensor([5.0, 0.1, 0.0])  # word 0
    feats[0, :, 0, 1] = torch.tensor([0.0, 0.2, 3.0])  # word 2
    _, _, labels = encode_words(feats, book)
    assert labels.tolist() == [[1.0, 0.0, 1.0, 0.0]]


def test_features_detached_codebook_gets_gradient():
    feats = torch.randn(2, 4, 3, 3, requires_grad=True)
    book = torch.randn(5, 4, requires_grad=True)
    _, hist, _ = encode_words(feats, book)
    (hist * torch.randn_like(hist)).sum().backward()
    assert feats.grad is None
    assert book.grad is not None and book.grad.abs().sum() > 0


def test_encode_words_float32_under_autocast():
    feats = torch.randn(2, 16, 4, 4)
    book = torch.randn(8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, hist, _ = encode_words(feats.bfloat16(), book)
    assert a.dtype == torch.float32 and hist.dtype == torch.float32
    ref_a, ref_h, _ = encode_words(feats.bfloat16().float(), book)
    torch.testing.assert_close(hist, ref_h)


def test_decorrelation_loss_by_hand():
    v = torch.tensor([[1.0, 2.0, 3.0], [0.0, 1.0, -1.0]])
    c = v - v.mean(1, keepdim=True)  # [[-1,0,1],[0,1,-1]]
    g = [[2.0, -1.0], [-1.0, 2.0]]
    assert c.tolist() == [[-1.0, 0.0, 1.0], [0.0, 1.0, -1.0]]
    expected = 0.5 * (math.sqrt(sum(x * x for row in g for x in row)) - math.sqrt(2.0 ** 2 + 2.0 ** 2))
    assert decorrelation_loss(v).item() == pytest.approx(expected)
    # orthogonal centred words: zero loss
    assert decorrelation_loss(torch.tensor([[1.0, -1.0, 0.0], [1.0, 1.0, -2.0]])).item() == pytest.approx(0.0, abs=1e-6)


def test_learned_codebook_init_is_kaiming_normal_sqrt5():
    torch.manual_seed(0)
    cb = LearnedCodebook(256, 512)
    assert cb.weight.requires_grad and cb.weight.shape == (256, 512)
    # kaiming normal with a = sqrt(5), fan_in = D: std = sqrt(2 / (1 + 5)) / sqrt(D)
    assert cb.weight.std().item() == pytest.approx(math.sqrt(2 / 6) / math.sqrt(512), rel=0.02)
    assert cb.weight.mean().item() == pytest.approx(0.0, abs=1e-3)


def naive_memory_update(book, feats, rho):
    """Assign each pixel by argmax cosine, average un-normalised vectors per word, EMA."""
    b, d, h, w = feats.shape
    k = book.shape[0]
    vn = book.double() / book.double().norm(dim=1, keepdim=True)
    sums = torch.zeros(k, d, dtype=torch.float64)
    counts = [0] * k
    for bi in range(b):
        for i in range(h):
            for j in range(w):
                vec = feats[bi, :, i, j].double()
                kk = int(torch.argmax(vn @ (vec / vec.norm())))
                sums[kk] += vec
                counts[kk] += 1
    means = torch.stack([sums[kk] / counts[kk] if counts[kk] else torch.zeros(d, dtype=torch.float64)
                         for kk in range(k)])
    return rho * means + (1 - rho) * book.double(), counts


def test_memory_bank_init_and_update_match_naive():
    torch.manual_seed(1)
    bank = MemoryBankCodebook(5, 6, rho=0.3)
    # Kaiming-normal random at first (the published code labels step 1 against it)
    assert not bool(bank.initialised) and bank.weight.abs().sum() > 0
    first = torch.randn(2, 6, 3, 3)
    rng = torch.get_rng_state()
    bank.initialise_from(first)
    assert bool(bank.initialised)
    vectors = first.permute(0, 2, 3, 1).reshape(-1, 6)
    # the published draw: K indices, uniform with replacement, from torch's default CPU generator
    torch.set_rng_state(rng)
    assert torch.equal(bank.weight, vectors[torch.randint(vectors.shape[0], (5,))])
    for step in range(3):
        feats = torch.randn(2, 6, 3, 4) + step
        expected, counts = naive_memory_update(bank.weight.clone(), feats, 0.3)
        a, _, _ = encode_words(feats, bank.weight)
        bank.update(feats, a.argmax(1))
        torch.testing.assert_close(bank.weight.double(), expected, rtol=1e-5, atol=1e-6)
        assert sum(counts) == 24


def test_memory_bank_draw_is_with_replacement():
    """More words than feature vectors: every word is still one of them (repeats allowed)."""
    torch.manual_seed(0)
    bank = MemoryBankCodebook(32, 3)
    feats = torch.randn(1, 3, 2, 2)
    bank.initialise_from(feats)
    vectors = feats.permute(0, 2, 3, 1).reshape(-1, 3)
    for word in bank.weight:
        assert (vectors == word).all(1).any()
    assert len({tuple(w.tolist()) for w in bank.weight}) <= 4


def test_memory_bank_random_start_is_kaiming_normal_sqrt5():
    torch.manual_seed(0)
    bank = MemoryBankCodebook(256, 512)
    assert bank.weight.std().item() == pytest.approx(math.sqrt(2 / 6) / math.sqrt(512), rel=0.02)
    bank.sync_initial()  # one process: nothing to fetch, the random codebook stays
    assert bank.weight.std().item() == pytest.approx(math.sqrt(2 / 6) / math.sqrt(512), rel=0.02)


def test_unassigned_words_decay_toward_zero():
    book = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    feats = torch.tensor([[2.0, 0.1], [3.0, -0.1]]).T.reshape(1, 2, 1, 2)  # both pixels -> word 0
    means = assigned_means(feats, torch.zeros(1, 1, 2, dtype=torch.long), 3)
    torch.testing.assert_close(means, torch.tensor([[2.5, 0.0], [0.0, 0.0], [0.0, 0.0]]))
    bank = MemoryBankCodebook(3, 2, rho=0.5)
    bank.weight.copy_(book)
    bank.initialised.fill_(True)
    bank.update(feats, torch.zeros(1, 1, 2, dtype=torch.long))
    torch.testing.assert_close(bank.weight, torch.tensor([[1.75, 0.0], [0.0, 0.5], [-0.5, 0.0]]))


def test_memory_bank_state_dict_roundtrip():
    bank = MemoryBankCodebook(4, 3, rho=0.1)
    bank.initialise_from(torch.randn(1, 3, 2, 3))
    state = bank.state_dict()
    assert set(state) == {"weight", "initialised"}
    fresh = MemoryBankCodebook(4, 3, rho=0.1)
    fresh.load_state_dict(state)
    assert bool(fresh.initialised) and torch.equal(fresh.weight, bank.weight)
    assert list(fresh.parameters()) == []
