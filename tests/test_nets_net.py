"""VWENet: each loss term against a hand computation, CAM path, freezing, parameter groups, precision."""
import math

import pytest
import torch

from vwe.formats.config import load_config
from vwe.nets.cam import build_model, param_groups
from vwe.nets.pooling import hybrid_pyramid_pool
from vwe.nets.words import encode_words
from vwe.runtime.errors import ConfigError


def _cfg(*overrides):
    base = ["model.backbone=resnet18", "model.pretrained=none", "model.norm=batch", "model.num_words=16",
            "model.channels_last=false"]
    return load_config(None, base + list(overrides)).model


def _labels(b=2, c=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = (torch.rand(b, c, generator=g) > 0.8).float()
    y[:, 0] = 1.0
    return y


def hand_mlsm(logits, targets):
    total = 0.0
    b, c = logits.shape
    for i in range(b):
        for j in range(c):
            x, y = float(logits[i, j]), float(targets[i, j])
            p = 1 / (1 + math.exp(-x))
            total -= y * math.log(p) + (1 - y) * math.log(1 - p)
    return total / (b * c)


def test_learned_forward_and_each_loss_by_hand():
    torch.manual_seed(0)
    model = build_model(_cfg("model.cls_weight=0.5", "model.hist_weight=2.0", "model.word_weight=3.0",
                             "model.decorrelation_weight=0.7")).train()
    x = torch.randn(2, 3, 80, 64)
    y = _labels()
    out = model(x)
    # recompute every output from its definition
    feats = model.backbone(x).detach()
    assert feats.shape == (2, 512, 5, 4)
    w_cls = model.classifier.weight.detach()[:, :, 0, 0]
    s = hybrid_pyramid_pool(feats).flatten(1) @ w_cls.T
    _, hist, word_labels = encode_words(feats, model.codebook.weight.detach())
    s_hist = hist.flatten(1) @ model.hist_head.weight.detach()[:, :, 0, 0].T
    s_word = feats.mean((2, 3)) @ model.word_head.weight.detach()[:, :, 0, 0].T
    torch.testing.assert_close(out["logits"].detach(), s, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["hist_logits"].detach(), s_hist, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out["word_logits"].detach(), s_word, rtol=1e-4, atol=1e-5)
    assert torch.equal(out["word_labels"], word_labels)
    losses = model.losses(out, y)
    assert set(losses) == {"cls", "hist", "word", "decorrelation", "loss"}
    assert losses["cls"].item() == pytest.approx(hand_mlsm(s, y), rel=1e-4)
    assert losses["hist"].item() == pytest.approx(hand_mlsm(s_hist, y), rel=1e-4)
    assert losses["word"].item() == pytest.approx(hand_mlsm(s_word, word_labels), rel=1e-4)
    v = model.codebook.weight.detach().double()
    v = v - v.mean(1, keepdim=True)
    g = v @ v.T
    decor = 0.5 * (math.sqrt(float((g ** 2).sum())) - math.sqrt(float((torch.diagonal(g) ** 2).sum())))
    assert losses["decorrelation"].item() == pytest.approx(decor, rel=1e-4)
    expected = (0.5 * losses["cls"] + 2.0 * losses["hist"] + 3.0 * losses["word"]
                + 0.7 * losses["decorrelation"])
    assert losses["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    losses["loss"].backward()
    for p in (model.classifier.weight, model.hist_head.weight, model.word_head.weight, model.codebook.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


def _naive_ema(book, feats, rho):
    """Assign each pixel by argmax cosine, average the un-normalised vectors per word (0 where none), EMA."""
    k, d = book.shape
    vn = book.double() / book.double().norm(dim=1, keepdim=True)
    vectors = feats.double().permute(0, 2, 3, 1).reshape(-1, d)
    winners = (torch.nn.functional.normalize(vectors, dim=1) @ vn.T).argmax(1)
    means = torch.zeros(k, d, dtype=torch.float64)
    for kk in range(k):
        if (winners == kk).any():
            means[kk] = vectors[winners == kk].mean(0)
    return rho * means + (1 - rho) * book.double()


def test_memory_bank_step1_random_labels_then_features_then_ema():
    """The published order: step 1 labels words against the Kaiming-random codebook, then the codebook
    becomes K feature vectors of that batch drawn with replacement (no EMA at step 1); EMA from step 2."""
    torch.manual_seed(0)
    model = build_model(_cfg("model.codebook=memory", "model.memory_rho=0.5")).train()
    assert not model.hist_head.weight.requires_grad
    assert list(model.codebook.parameters()) == []
    assert not bool(model.codebook.initialised)
    random_book = model.codebook.weight.clone()
    assert random_book.std().item() == pytest.approx(math.sqrt(2 / 6) / math.sqrt(512), rel=0.1)
    x1, x2 = torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64)
    with torch.no_grad():  # train-mode features (batch statistics), as the training forward sees them
        f1 = model.backbone(x1)
    rng = torch.get_rng_state()
    out = model(x1)
    assert out["hist_logits"] is None and bool(model.codebook.initialised)
    # step 1's word labels come from the random codebook
    assert torch.equal(out["word_labels"], encode_words(f1, random_book)[2])
    # ... and the codebook is now the published draw from the batch's vectors, not an EMA
    torch.set_rng_state(rng)
    vectors = f1.permute(0, 2, 3, 1).reshape(-1, f1.shape[1])
    drawn = vectors[torch.randint(vectors.shape[0], (16,))]
    torch.testing.assert_close(model.codebook.weight, drawn)
    losses = model.losses(out, _labels())
    assert set(losses) == {"cls", "word", "loss"}
    assert losses["loss"].item() == pytest.approx((losses["cls"] + losses["word"]).item(), rel=1e-6)
    # step 2: labels against the drawn codebook, then the EMA toward the assigned means
    after_first = model.codebook.weight.clone()
    with torch.no_grad():
        f2 = model.backbone(x2)
    out2 = model(x2)
    assert torch.equal(out2["word_labels"], encode_words(f2, after_first)[2])
    torch.testing.assert_close(model.codebook.weight.double(), _naive_ema(after_first, f2, 0.5),
                               rtol=1e-5, atol=1e-6)
    model.eval()
    frozen = model.codebook.weight.clone()
    with torch.no_grad():
        model(x1)
    assert torch.equal(model.codebook.weight, frozen)  # no update outside training
    # the codebook is training state: it travels in the state dict
    clone = build_model(_cfg("model.codebook=memory", "model.memory_rho=0.5"))
    clone.load_state_dict(model.state_dict())
    assert torch.equal(clone.codebook.weight, frozen) and bool(clone.codebook.initialised)


def test_memory_bank_with_accumulation_is_announced():
    """The memory bank updates per micro-batch; with accumulation that departs from the published
    once-per-step update, which the recipe's check says before anything is built."""
    import warnings

    from vwe.training.recipe import CamRecipe
    with pytest.warns(UserWarning, match=r"model.codebook=memory with train.grad_accum=2: .* once per step"):
        CamRecipe().check(load_config(None, ["model.codebook=memory", "train.grad_accum=2"]), 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CamRecipe().check(load_config(None, ["model.codebook=memory"]), 1)
        CamRecipe().check(load_config(None, ["train.grad_accum=2"]), 1)


def test_cam_is_relu_classifier_on_features_and_skips_word_heads():
    torch.manual_seed(0)
    model = build_model(_cfg("model.codebook=memory")).train()
    x = torch.randn(1, 3, 64, 96)
    cam = model.cam(x)
    assert cam.shape == (1, 20, 4, 6)
    feats = model.backbone(x)
    ref = torch.einsum("bdhw,cd->bchw", feats, model.classifier.weight[:, :, 0, 0]).clamp(min=0)
    torch.testing.assert_close(cam, ref, rtol=1e-4, atol=1e-5)
    assert (cam >= 0).all() and (cam > 0).any()
    assert not bool(model.codebook.initialised)  # the word path never ran


@pytest.mark.filterwarnings("ignore:model.pretrained=none with model.norm=frozen")
@pytest.mark.parametrize("overrides", [
    ("model.norm=frozen", "model.detach_stage2=true"),
    ("model.codebook=memory", "model.detach_stage2=false"),
    ("model.hist_weight=0", "model.decorrelation_weight=0"),
])
def test_frozen_parts_get_no_gradient_and_do_not_change(overrides):
    torch.manual_seed(0)
    model = build_model(_cfg(*overrides)).train()
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert "backbone.conv1.weight" in frozen
    if "model.codebook=memory" in overrides or "model.hist_weight=0" in overrides:
        assert "hist_head.weight" in frozen
    if "model.detach_stage2=true" in overrides:
        assert "backbone.layer2.1.conv2.weight" in frozen and "backbone.layer3.0.conv1.weight" in trainable
    if "model.hist_weight=0" in overrides:
        assert "codebook.weight" in frozen
    opt = torch.optim.SGD(param_groups(model, 0.1, 10.0, 1e-2), lr=0.1, momentum=0.9)
    for step in range(2):
        opt.zero_grad(set_to_none=True)
        out = model(torch.randn(2, 3, 64, 64))
        model.losses(out, _labels(seed=step))["loss"].backward()
        # every trainable parameter gets a gradient (so DDP needs no find_unused_parameters)
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
        assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
        opt.step()
    params = dict(model.named_parameters())
    for n, before in frozen.items():
        assert torch.equal(params[n], before), n
    changed = [n for n, before in trainable.items() if not torch.equal(params[n], before)]
    assert len(changed) == len(trainable)


@pytest.mark.parametrize("pooling,hist,word", [("gap", 0, 0), ("hspp", 0, 0), ("gap", 1, 1), ("hspp", 1, 1),
                                               ("hspp", 0, 1), ("hspp", 1, 0)])
def test_ablation_pooling_and_heads_off(pooling, hist, word):
    torch.manual_seed(0)
    model = build_model(_cfg(f"model.pooling={pooling}", f"model.hist_weight={hist}",
                             f"model.word_weight={word}")).train()
    x = torch.randn(2, 3, 64, 80)
    out = model(x)
    feats = model.backbone(x).detach()
    pooled = feats.mean((2, 3)) if pooling == "gap" else hybrid_pyramid_pool(feats).flatten(1)
    torch.testing.assert_close(out["logits"].detach(), pooled @ model.classifier.weight.detach()[:, :, 0, 0].T,
                               rtol=1e-4, atol=1e-5)
    assert (out["hist_logits"] is None) == (hist == 0)
    assert (out["word_logits"] is None) == (word == 0) and (out["word_labels"] is None) == (word == 0)
    losses = model.losses(out, _labels())
    expected_terms = {"cls", "loss"} | ({"hist"} if hist else set()) | ({"word"} if word else set())
    assert set(losses) == expected_terms
    assert model.hist_head.weight.requires_grad == bool(hist)
    assert model.word_head.weight.requires_grad == bool(word)
    assert model.codebook.weight.requires_grad == bool(hist)
    losses["loss"].backward()
    # every trainable parameter has a gradient: DDP needs no find_unused_parameters
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_pooling_setting_refuses_unknown_value():

    with pytest.raises(ConfigError, match="'model.pooling' must be one of hspp, gap"):
        load_config(None, ["model.pooling=max"])


@pytest.mark.filterwarnings("ignore:model.pretrained=none with model.norm=frozen")
def test_param_groups_put_bn_affine_in_backbone_group_with_weight_decay():
    """The published code: gamma/beta train at the backbone lr with weight decay on every parameter;
    the stem's bn1 and (when detached) stages 1-2 are not trained."""
    model = build_model(_cfg("model.norm=frozen", "model.detach_stage2=true"))
    groups = {g["name"]: g for g in param_groups(model, lr=0.01, head_lr_mult=10.0, weight_decay=1e-4)}
    backbone = {id(p) for p in groups["backbone"]["params"]}
    bb = model.backbone
    assert id(bb.layer3[0].bn1.weight) in backbone and id(bb.layer4[1].bn2.bias) in backbone
    assert id(bb.layer4[0].downsample[1].weight) in backbone
    assert id(bb.bn1.weight) not in backbone and id(bb.layer2[0].bn1.weight) not in backbone
    assert groups["backbone"]["weight_decay"] == 1e-4 and groups["backbone"]["lr"] == 0.01
    # resnet18, layer3-4: 2 x (2 blocks x 2 BN + 1 downsample) x 2 stages = 20 BN tensors, 10 convs
    assert len(groups["backbone"]["params"]) == 20 + 10
    assert len(param_groups(build_model(_cfg("model.norm=frozen_all", "model.detach_stage2=true")),
                            0.01, 10.0, 1e-4)[0]["params"]) == 10


def test_param_groups_lr_and_membership():
    model = build_model(_cfg("model.detach_stage2=true"))
    groups = param_groups(model, lr=0.01, head_lr_mult=10.0, weight_decay=1e-4)
    assert [g["name"] for g in groups] == ["backbone", "heads"]
    assert groups[0]["lr"] == 0.01 and groups[1]["lr"] == pytest.approx(0.1)
    assert all(g["weight_decay"] == 1e-4 for g in groups)
    heads = {id(p) for p in groups[1]["params"]}
    assert heads == {id(model.classifier.weight), id(model.hist_head.weight), id(model.word_head.weight),
                     id(model.codebook.weight)}
    backbone = {id(p) for p in groups[0]["params"]}
    assert backbone == {id(p) for p in model.backbone.parameters() if p.requires_grad}
    assert id(model.backbone.layer1[0].conv1.weight) not in backbone
    # a DDP-style wrapper exposing .module gives the same groups
    wrapper = torch.nn.Module()
    wrapper.module = model
    assert [len(g["params"]) for g in param_groups(wrapper, 0.01, 10.0, 0.0)] == [len(g["params"]) for g in groups]


def test_bf16_autocast_keeps_word_encoding_float32():
    torch.manual_seed(0)
    model = build_model(_cfg("model.channels_last=true")).train()
    assert model.backbone.layer1[0].conv1.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        losses = model.losses(out, _labels())
    assert out["logits"].dtype == torch.bfloat16
    assert losses["loss"].dtype == torch.float32 and torch.isfinite(losses["loss"])
    # the histogram is float32 before the W_a convolution: compare with a float32 re-encoding
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feats = model.backbone(x)
    _, hist, _ = encode_words(feats, model.codebook.weight)
    assert hist.dtype == torch.float32
    torch.testing.assert_close(hist.sum((1, 2, 3)), torch.full((2,), 16.0), rtol=1e-5, atol=1e-4)
    # ... and so is its head: the counts are not rounded to bf16 on the way in
    assert out["hist_logits"].dtype == torch.float32
    want = model.hist_head(hist).flatten(1)
    torch.testing.assert_close(out["hist_logits"], want, rtol=1e-5, atol=1e-6)
    losses["loss"].backward()
    assert model.codebook.weight.grad.dtype == torch.float32


@pytest.mark.filterwarnings("ignore:model.pretrained=none with model.norm=frozen")
def test_resnet50_smoke():
    torch.manual_seed(0)
    model = build_model(_cfg("model.backbone=resnet50", "model.norm=frozen", "model.num_words=32")).train()
    out = model(torch.randn(1, 3, 64, 64))
    assert out["logits"].shape == (1, 20) and out["word_logits"].shape == (1, 32)
    model.losses(out, _labels(1))["loss"].backward()
    assert model.classifier.weight.grad.shape == (20, 2048, 1, 1)


def test_model_from_scratch_with_trainable_norm_learns():
    """Training from scratch with batch norm must actually reduce the loss on a fixed batch."""
    torch.manual_seed(0)
    model = build_model(_cfg("model.norm=batch", "model.detach_stage2=false")).train()
    opt = torch.optim.SGD(param_groups(model, 0.02, 10.0, 1e-4), lr=0.02, momentum=0.9)
    x = torch.randn(4, 3, 64, 64)
    y = _labels(4)
    first = None
    for _ in range(8):
        opt.zero_grad(set_to_none=True)
        losses = model.losses(model(x), y)
        first = losses["cls"].item() if first is None else first
        losses["loss"].backward()
        opt.step()
    final = model.losses(model(x), y)["cls"].item()
    assert math.isfinite(final) and final < 0.7 * first
