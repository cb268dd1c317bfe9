"""Backbone: output stride, norms, freezing, checkpointing, BN folding, weights files."""
import logging

import pytest
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn

from vwe.runtime.errors import CheckpointError
from vwe.nets.backbone import (Backbone, FrozenBatchNorm2d, build_backbone, fold_frozen_bn,
                                imagenet_weights_file)


def _randomise_bn(module: nn.Module, seed: int = 0) -> None:
    """Non-trivial running statistics and affine, so frozen-BN tests compare real values."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, (FrozenBatchNorm2d, nn.BatchNorm2d)):
            n = m.running_mean.shape[0]
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)


@pytest.mark.parametrize("name,channels", [("resnet18", 512), ("resnet50", 2048)])
def test_output_stride_16(name, channels):
    bb = Backbone(name, norm="frozen").eval()
    assert bb.out_channels == channels
    with torch.no_grad():
        assert bb(torch.randn(1, 3, 64, 80)).shape == (1, channels, 4, 5)
        assert bb(torch.randn(1, 3, 65, 49)).shape == (1, channels, 5, 4)  # ceil(size / 16)
    # no dilation anywhere
    assert all(m.dilation == (1, 1) for m in bb.modules() if isinstance(m, nn.Conv2d))


def test_frozen_bn_statistics_fixed_affine_trained():
    """norm=frozen (the published code's "fixed" BatchNorm): eval-mode normalisation in training too,
    running statistics never change, gamma/beta are parameters that learn (except the stem's)."""
    torch.manual_seed(0)
    bb = Backbone("resnet18", norm="frozen")
    _randomise_bn(bb)
    stats = {k: v.clone() for k, v in bb.state_dict().items() if "running" in k}
    x = torch.randn(2, 3, 64, 64)
    bb.train()
    y_train = bb(x)
    bb.eval()
    with torch.no_grad():
        y_eval = bb(x)
    torch.testing.assert_close(y_train.detach(), y_eval)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in bb.modules())
    params = {n: p for n, p in bb.named_parameters()}
    assert params["layer1.0.bn1.weight"].requires_grad and params["layer4.0.downsample.1.bias"].requires_grad
    assert not params["bn1.weight"].requires_grad and not params["bn1.bias"].requires_grad
    before = {n: p.detach().clone() for n, p in params.items()}
    opt = torch.optim.SGD(bb.parameters(), lr=0.1, weight_decay=1e-2)
    bb.train()
    for _ in range(2):
        opt.zero_grad()
        bb(x).square().mean().backward()
        opt.step()
    for k, v in bb.state_dict().items():
        if "running" in k:
            assert torch.equal(v, stats[k]), k
    assert not torch.equal(bb.layer3[0].bn2.weight, before["layer3.0.bn2.weight"])
    assert not torch.equal(bb.layer1[0].bn1.bias, before["layer1.0.bn1.bias"])
    assert torch.equal(bb.bn1.weight, before["bn1.weight"]) and torch.equal(bb.bn1.bias, before["bn1.bias"])


def test_frozen_bn_matches_torch_eval_batchnorm():
    """Output and gamma/beta gradients equal nn.BatchNorm2d in eval mode (torch's own kernel)."""
    torch.manual_seed(0)
    ours, ref = FrozenBatchNorm2d(6), nn.BatchNorm2d(6).eval()
    _randomise_bn(ours, seed=1)
    _randomise_bn(ref, seed=1)
    x = torch.randn(2, 6, 5, 4, dtype=torch.float64)
    ours, ref = ours.double(), ref.double()
    w = torch.randn(2, 6, 5, 4, dtype=torch.float64)
    (ours(x) * w).sum().backward()
    (ref(x) * w).sum().backward()
    torch.testing.assert_close(ours(x), ref(x))
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad)
    torch.testing.assert_close(ours.bias.grad, ref.bias.grad)


@pytest.mark.parametrize("train_affine", [True, False])
def test_frozen_bn_keeps_its_map_only_while_its_tensors_are_unchanged(train_affine):
    """The kept scale/shift (and inverse std) give the bits of the formula computed afresh, and are
    recomputed after every way the statistics or gamma/beta change: load_state_dict, an in-place write, an
    optimizer step, a move to another dtype; inference_mode's tensors never reach a backward."""
    def fresh(bn, x):  # the map computed anew, in the layer's own formula
        scale, shift = bn.scale_shift()
        return torch.addcmul(shift.view(1, -1, 1, 1).to(x.dtype), x, scale.view(1, -1, 1, 1).to(x.dtype))

    bn = FrozenBatchNorm2d(6, train_affine=train_affine)
    _randomise_bn(bn, seed=1)
    x = torch.randn(2, 6, 5, 4)
    for change in ("none", "state_dict", "in place", "step", "double", "inference", "inference tensors"):
        if change == "state_dict":
            other = FrozenBatchNorm2d(6, train_affine=train_affine)
            _randomise_bn(other, seed=2)
            bn.load_state_dict(other.state_dict())
        elif change == "in place":
            bn.running_var.mul_(3.0)
            bn.running_mean.add_(0.5)
        elif change == "step" and train_affine:
            opt = torch.optim.SGD(bn.parameters(), lr=0.5)
            bn(x).square().mean().backward()
            opt.step()
        elif change == "double":
            bn, x = bn.double(), x.double()
        elif change == "inference tensors":  # a layer built under inference_mode: nothing to keep, still right
            with torch.inference_mode():
                bn = FrozenBatchNorm2d(6, train_affine=train_affine).double()
                _randomise_bn(bn, seed=3)
                assert torch.equal(bn(x), fresh(bn, x))
            continue
        with torch.inference_mode(change == "inference"):
            assert torch.equal(bn(x), fresh(bn, x)), change
        with torch.no_grad():
            assert torch.equal(bn(x), fresh(bn, x)), change
        y = x.clone().requires_grad_()
        bn(y).sum().backward()  # after inference_mode too: its kept tensors are apart
        assert torch.equal(y.grad, bn.scale_shift()[0].detach().view(1, -1, 1, 1).to(x.dtype).expand_as(x)), change


def test_frozen_all_freezes_the_affine_too():
    bb = Backbone("resnet18", norm="frozen_all")
    assert not any("bn" in n or "downsample.1" in n for n, _ in bb.named_parameters())
    # same state-dict keys as norm=frozen: weights move between the two
    assert set(bb.state_dict()) == set(Backbone("resnet18", norm="frozen").state_dict())
    _randomise_bn(bb)
    before = {k: v.clone() for k, v in bb.state_dict().items() if "bn" in k or "downsample.1" in k}
    bb.train()
    opt = torch.optim.SGD([p for p in bb.parameters() if p.requires_grad], lr=0.1)
    bb(torch.randn(2, 3, 64, 64)).square().mean().backward()
    opt.step()
    for k, v in before.items():
        assert torch.equal(bb.state_dict()[k], v), k


def _trainable_bn_tensors(bb: nn.Module) -> int:
    return sum(int(p.requires_grad) for m in bb.modules() if isinstance(m, FrozenBatchNorm2d)
               for p in m.parameters())


# The published networks (VWE: ResNet-50, stage 2 detached; VWL-L: ResNet-101, detached; VWL-M:
# ResNet-101, not detached) list 53 / 104 / 104 BatchNorm layers in their state dicts (stem bn1
# included), 29 / 80 / 80 of them in layer3-4. Trained gamma/beta there: 2 tensors per BatchNorm outside
# the frozen stem, and outside stages 1-2 when detached: 2 * 29 = 58, 2 * 80 = 160, 2 * 103 = 206.
@pytest.mark.parametrize("name,detach,bn_layers,trained", [
    ("resnet50", True, 53, 58), ("resnet101", True, 104, 160), ("resnet101", False, 104, 206)])
def test_trainable_bn_affine_count_matches_published_networks(name, detach, bn_layers, trained):
    bb = Backbone(name, norm="frozen", detach_stage2=detach)
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in bb.modules()) == bn_layers
    assert _trainable_bn_tensors(bb) == trained
    assert _trainable_bn_tensors(Backbone(name, norm="frozen_all", detach_stage2=detach)) == 0


def test_trainable_norms_learn_and_stem_is_frozen():
    for norm, cls in [("batch", nn.BatchNorm2d), ("group", nn.GroupNorm)]:
        bb = Backbone("resnet18", norm=norm).train()
        assert any(isinstance(m, cls) for m in bb.modules())
        trainable = {n for n, p in bb.named_parameters() if p.requires_grad}
        assert "layer1.0.bn1.weight" in trainable and "layer4.1.bn2.bias" in trainable
        assert "conv1.weight" not in trainable and "bn1.weight" not in trainable
        x = torch.randn(2, 3, 64, 64)
        bb(x).square().mean().backward()
        assert bb.conv1.weight.grad is None and bb.bn1.weight.grad is None
        assert bb.layer1[0].bn1.weight.grad.abs().sum() > 0


def test_detach_stage2_freezes_stages_1_2():
    bb = Backbone("resnet18", norm="frozen", detach_stage2=True).train()
    frozen = {n.split(".")[0] for n, p in bb.named_parameters() if not p.requires_grad}
    trainable = {n.split(".")[0] for n, p in bb.named_parameters() if p.requires_grad}
    assert frozen == {"conv1", "bn1", "layer1", "layer2"} and trainable == {"layer3", "layer4"}
    bb(torch.randn(1, 3, 64, 64)).sum().backward()
    assert all(p.grad is None for p in bb.layer2.parameters())
    assert all(p.grad is not None for p in bb.layer3.parameters())
    undetached = Backbone("resnet18", norm="frozen", detach_stage2=False)
    assert all(p.requires_grad for p in undetached.layer1.parameters())


def _grads(bb, x):
    bb.zero_grad(set_to_none=True)
    out = bb(x)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in bb.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("norm,detach", [("frozen", True), ("batch", False)])
def test_grad_checkpointing_same_gradients_and_stats(norm, detach):
    torch.manual_seed(0)
    plain = Backbone("resnet18", norm=norm, detach_stage2=detach).train()
    if norm == "frozen":
        _randomise_bn(plain)
    ckpt = Backbone("resnet18", norm=norm, detach_stage2=detach, grad_checkpointing=True).train()
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 64, 64)
    out_a, grads_a = _grads(plain, x)
    out_b, grads_b = _grads(ckpt, x)
    torch.testing.assert_close(out_a, out_b)
    assert grads_a.keys() == grads_b.keys()
    assert len(grads_a) == sum(p.requires_grad for p in plain.parameters()) >= 10
    for k in grads_a:
        torch.testing.assert_close(grads_a[k], grads_b[k], rtol=1e-4, atol=1e-6, msg=k)
    # the recomputation does not update BatchNorm running statistics a second time
    sa, sb = plain.state_dict(), ckpt.state_dict()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], msg=k)


def test_channels_last_same_output():
    torch.manual_seed(0)
    a = Backbone("resnet18", norm="frozen").eval()
    _randomise_bn(a)
    b = Backbone("resnet18", norm="frozen", channels_last=True).eval()
    b.load_state_dict(a.state_dict())
    b = b.to(memory_format=torch.channels_last)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("norm", ["frozen", "frozen_all"])
def test_fold_frozen_bn_same_output(norm):
    torch.manual_seed(0)
    bb = Backbone("resnet18", norm=norm).eval()
    _randomise_bn(bb)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = bb(x)
        n = fold_frozen_bn(bb)
        got = bb(x)
    assert n == 1 + 8 * 2 + 3  # stem, 8 blocks x 2, 3 downsample
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in bb.modules())
    # float32 rounding differs after ~20 folded layers: compare relative to the output's scale
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_fold_after_training_the_affine():
    """Folding uses the trained gamma/beta: a model trained a step under norm=frozen folds to the same
    numbers, and the folded convolutions are plain inference weights."""
    torch.manual_seed(0)
    bb = Backbone("resnet18", norm="frozen")
    _randomise_bn(bb)
    opt = torch.optim.SGD([p for p in bb.parameters() if p.requires_grad], lr=0.5)
    bb.train()
    bb(torch.randn(2, 3, 64, 64)).square().mean().backward()
    opt.step()
    x = torch.randn(1, 3, 64, 80)
    bb.eval()
    with torch.no_grad():
        ref = bb(x)
        fold_frozen_bn(bb)
        got = bb(x)
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()


# ------------------------------------------------------------------------------------ weights files

@pytest.fixture(scope="module")
def tv_resnet18():
    torch.manual_seed(3)
    m = torchvision.models.resnet18(weights=None)
    _randomise_bn(m, seed=3)
    return m


def _check_loaded(bb, tv):
    own = bb.state_dict()
    for k, v in tv.state_dict().items():
        if k.startswith("fc.") or k.endswith("num_batches_tracked"):
            continue
        assert torch.equal(own[k], v), k


@pytest.mark.parametrize("fmt", ["pth", "safetensors", "legacy"])
def test_torchvision_state_dict_loads(tmp_path, tv_resnet18, fmt, caplog):
    sd = tv_resnet18.state_dict()
    path = tmp_path / f"r18.{ 'safetensors' if fmt == 'safetensors' else 'pth'}"
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    elif fmt == "pth":
        torch.save(sd, path)
    else:  # like resnet50-19c8e357.pth: pre-zip serialisation, BatchNorm without num_batches_tracked
        torch.save({k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}, path,
                   _use_new_zipfile_serialization=False)
    with caplog.at_level(logging.WARNING):
        bb, report = build_backbone("resnet18", pretrained=str(path), norm="frozen")
    _check_loaded(bb, tv_resnet18)
    assert report.missing == [] and report.unexpected == []
    assert not caplog.records


def test_missing_and_unexpected_keys_reported(tmp_path, tv_resnet18, caplog):
    sd = dict(tv_resnet18.state_dict())
    del sd["layer4.1.conv2.weight"]
    sd["extra.weight"] = torch.zeros(3)
    path = tmp_path / "partial.pth"
    torch.save(sd, path)
    with caplog.at_level(logging.WARNING):
        _, report = build_backbone("resnet18", pretrained=str(path), norm="batch")
    assert report.missing == ["layer4.1.conv2.weight"]
    assert report.unexpected == ["extra.weight"]
    assert "layer4.1.conv2.weight" in caplog.text and "extra.weight" in caplog.text


def test_shape_mismatch_refused(tmp_path, tv_resnet18):
    sd = dict(tv_resnet18.state_dict())
    sd["layer3.0.conv1.weight"] = torch.zeros(256, 128, 1, 1)
    path = tmp_path / "bad.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    with pytest.raises(CheckpointError, match=r"'layer3.0.conv1.weight' has shape \(256, 128, 1, 1\)"):
        build_backbone("resnet18", pretrained=str(path))


def test_other_model_or_missing_file_refused(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"encoder.weight": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="no key matches"):
        build_backbone("resnet18", pretrained=str(path))
    with pytest.raises(CheckpointError, match="not found"):
        build_backbone("resnet18", pretrained=str(tmp_path / "nope.pth"))


def test_group_norm_takes_bn_affine(tmp_path, tv_resnet18):
    path = tmp_path / "r18.pth"
    torch.save(tv_resnet18.state_dict(), path)
    bb, report = build_backbone("resnet18", pretrained=str(path), norm="group")
    assert report.unexpected == [] and report.missing == []
    assert torch.equal(bb.layer2[0].bn1.weight, tv_resnet18.layer2[0].bn1.weight)


def test_imagenet_from_torch_cache(tmp_path, monkeypatch, tv_resnet18):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    path, url = imagenet_weights_file("resnet18")
    assert path == tmp_path / "hub" / "checkpoints" / url.rsplit("/", 1)[-1]
    path.parent.mkdir(parents=True)
    torch.save(tv_resnet18.state_dict(), path)
    bb, report = build_backbone("resnet18", pretrained="imagenet")
    _check_loaded(bb, tv_resnet18)


def test_imagenet_absent_names_file_and_folder(tmp_path, monkeypatch):
    # no cached file; this machine has no network, so the download fails and the error says what to do
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    path, _ = imagenet_weights_file("resnet34")
    try:
        import socket
        socket.create_connection(("download.pytorch.org", 443), timeout=3).close()
        pytest.skip("network available: the weights would download")
    except OSError:
        pass
    with pytest.raises(CheckpointError) as info:
        build_backbone("resnet34", pretrained="imagenet")
    assert path.name in str(info.value) and str(path.parent) in str(info.value)
    assert not path.exists()


def test_only_frozen_buffers_tells_which_models_have_buffers_that_change():
    """What decides DDP's per-forward buffer broadcast (vwe/training/setup.py): frozen BatchNorm's buffers
    never change; a trainable BatchNorm's statistics and a memory bank do."""
    from vwe.formats.config import load_config
    from vwe.nets.backbone import only_frozen_buffers
    from vwe.nets.cam import build_model

    def model(*overrides):
        built = build_model(load_config(None, ["model.pretrained=none", "model.backbone=resnet18",
                                               *overrides]).model)
        return built[0] if isinstance(built, tuple) else built

    assert only_frozen_buffers(model("model.norm=frozen", "model.codebook=learned"))
    assert only_frozen_buffers(model("model.norm=frozen_all", "model.codebook=learned"))
    assert not only_frozen_buffers(model("model.norm=frozen", "model.codebook=memory"))
    assert not only_frozen_buffers(model("model.norm=batch", "model.codebook=learned"))
    assert only_frozen_buffers(model("model.norm=group", "model.codebook=learned"))
