"""DeepLabV2 and the deeplab-pytorch recipe pieces: ASPP, output stride 8, frozen BatchNorm, weights
(ImageNet loads, segmentation weights refused), MSC and its loss, param groups, poly schedule, test-time
prediction and DenseCRF."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch import nn

from vwe.nets.backbone import FrozenBatchNorm2d
from vwe.nets.deeplab import (ASPP, MSC, DeepLabV2, build_deeplab,
                              crf_labels, dense_crf, msc_forward, predict_logits, predict_probs,
                              recipe_crf_image, refuse_segmentation_state, resize_labels, seg_loss,
                              seg_param_groups)
from vwe.runtime.errors import CheckpointError, SegmentationWeightsError, VweError
from vwe.training.setup import PolySchedule, poly_factor


@pytest.fixture(scope="module")
def imagenet_r101(tmp_path_factory):
    """torchvision's ImageNet-layout ResNet-101 state dict (random values) in a file of the hub cache's
    name, and the one ResNet-101 DeepLabV2 of this module built from it through seg.pretrained=imagenet."""
    home = tmp_path_factory.mktemp("torch_home")
    (home / "hub" / "checkpoints").mkdir(parents=True)
    torch.manual_seed(0)
    state = torchvision.models.resnet101(weights=None).state_dict()
    for k, v in state.items():  # non-trivial BatchNorm statistics, so loading them is visible
        if k.endswith("running_mean"):
            v.normal_(0, 0.1)
        elif k.endswith("running_var"):
            v.uniform_(0.5, 1.5)
    path = home / "hub" / "checkpoints" / "resnet101-63fe2227.pth"
    torch.save(state, path)
    mp = pytest.MonkeyPatch()
    mp.setenv("TORCH_HOME", str(home))
    try:
        model = build_deeplab(num_classes=21, backbone="resnet101", pretrained="imagenet")
    finally:
        mp.undo()
    return state, model.eval()


@pytest.fixture(scope="module")
def r50():
    torch.manual_seed(1)
    return DeepLabV2(num_classes=5, backbone="resnet50", norm="frozen_all")


def _randomise_bn(module: nn.Module) -> None:
    g = torch.Generator().manual_seed(0)
    for m in module.modules():
        if isinstance(m, FrozenBatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.copy_(torch.randn(n, generator=g) * 0.1)


# --------------------------------------------------------------------------------------- network

def test_aspp_is_the_sum_of_four_dilated_branches():
    torch.manual_seed(0)
    aspp = ASPP(6, 3)
    for conv in aspp.branches:  # non-zero biases so they count in the sum
        nn.init.normal_(conv.bias)
    x = torch.randn(2, 6, 30, 30)
    expected = sum(F.conv2d(x, c.weight, c.bias, padding=r, dilation=r)
                   for c, r in zip(aspp.branches, (6, 12, 18, 24)))
    torch.testing.assert_close(aspp(x), expected)
    assert [(c.kernel_size, c.dilation, c.padding) for c in aspp.branches] == \
        [((3, 3), (r, r), (r, r)) for r in (6, 12, 18, 24)]


def test_aspp_init_is_the_recipes(imagenet_r101):
    _, model = imagenet_r101
    w = torch.cat([c.weight.flatten() for c in model.aspp.branches])  # 4 x 21 x 2048 x 9 values
    assert abs(w.mean().item()) < 1e-4 and w.std().item() == pytest.approx(0.01, rel=0.01)
    assert all(torch.equal(c.bias, torch.zeros(21)) for c in model.aspp.branches)
    assert [c.weight.shape for c in model.aspp.branches] == [(21, 2048, 3, 3)] * 4


def test_output_stride_8_by_dilation(imagenet_r101):
    _, model = imagenet_r101
    with torch.no_grad():
        assert model(torch.randn(1, 3, 41, 33)).shape == (1, 21, 6, 5)  # ceil(size / 8)
    bb = model.backbone
    for stage, dilation in ((bb.layer1, 1), (bb.layer2, 1), (bb.layer3, 2), (bb.layer4, 4)):
        convs = [m for m in stage.modules() if isinstance(m, nn.Conv2d)]
        if stage in (bb.layer3, bb.layer4):
            assert all(c.stride == (1, 1) for c in convs)  # no stride after stage 2
        assert {b.conv2.dilation for b in list(stage)[1:]} == {(dilation, dilation)}
    # torchvision's first block of a dilated stage keeps the previous dilation in its 3x3
    assert bb.layer3[0].conv2.dilation == (1, 1) and bb.layer4[0].conv2.dilation == (2, 2)
    assert bb.layer2[0].conv2.stride == (2, 2) and len(bb.layer3) == 23


def test_imagenet_weights_fill_the_backbone(imagenet_r101):
    state, model = imagenet_r101
    own = model.backbone.state_dict()
    for k, v in state.items():
        if k.startswith("fc.") or k.endswith("num_batches_tracked"):
            assert k not in own
        else:
            assert torch.equal(own[k], v), k
    report = model.load_report
    assert report.missing == [] and report.unexpected == [] and report.loaded == len(own)


def test_frozen_bn_fixed_in_training(r50):
    """frozen_all (the recipe's freeze_bn + BatchNorm left out of the optimizer): no BatchNorm
    parameter at all, statistics and affine unchanged by a training step, train output = eval output."""
    model = r50
    _randomise_bn(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    params = dict(model.named_parameters())
    convs = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    aspp_bias = {f"aspp.branches.{i}.bias" for i in range(4)}
    assert set(params) == convs | aspp_bias  # convolutions (stem included) and ASPP biases only
    buffers = {k: v.clone() for k, v in model.state_dict().items() if k not in params}
    stem = params["backbone.conv1.weight"].detach().clone()
    x = torch.randn(1, 3, 40, 40)
    model.eval()
    with torch.no_grad():
        y_eval = model(x)
    model.train()
    y_train = model(x)
    torch.testing.assert_close(y_train.detach(), y_eval)
    opt = torch.optim.SGD(seg_param_groups(model, 0.1, 1e-2), lr=0.1, momentum=0.9)
    y_train.square().mean().backward()
    opt.step()
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in buffers.items())
    assert not torch.equal(after["backbone.conv1.weight"], stem)  # the stem trains, as in the recipe
    model.zero_grad(set_to_none=True)


# --------------------------------------------------------------------------------------- weights

def test_torchvision_segmentation_weights_refused(tmp_path):
    state = torchvision.models.segmentation.deeplabv3_resnet50(
        weights=None, weights_backbone=None, num_classes=21, aux_loss=True).state_dict()
    path = tmp_path / "init.pth"  # a neutral name: the keys give it away
    torch.save(state, path)
    with pytest.raises(SegmentationWeightsError, match="leaks full supervision") as e:
        build_deeplab(num_classes=21, backbone="resnet50", pretrained=str(path))
    assert isinstance(e.value, CheckpointError) and isinstance(e.value, VweError)  # CLI: exit code 2
    assert "VOC" in str(e.value) and "aux_classifier" in str(e.value)
    # without the auxiliary head, and behind a DDP prefix: the nested classifier still gives it away
    no_aux = {f"module.{k}": v for k, v in state.items() if not k.startswith("aux_classifier.")}
    with pytest.raises(SegmentationWeightsError, match="classifier"):
        refuse_segmentation_state(no_aux, "x.pth")
    lraspp = torchvision.models.segmentation.lraspp_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=21).state_dict()
    with pytest.raises(SegmentationWeightsError):
        refuse_segmentation_state(lraspp, "y.pth")
    # vwe's own CAM network (backbone.* + a flat classifier.weight) is no segmentation head
    refuse_segmentation_state({"backbone.conv1.weight": torch.zeros(1), "classifier.weight": torch.zeros(1)},
                              "cam.safetensors")


@pytest.mark.parametrize("name", ["deeplabv3_resnet101_coco-586e9e4e.pth", "fcn_resnet50_coco-1167a1af.pth",
                                  "lraspp_mobilenet_v3_large-d234d4ea.pth",
                                  "DeepLabV3_ResNet101_Weights.COCO_WITH_VOC_LABELS_V1",
                                  "deeplabv1_resnet101-coco.pth"])
def test_segmentation_weights_refused_by_name(tmp_path, name):
    """Refused before the file is read: these names are not even there."""
    with pytest.raises(SegmentationWeightsError, match="by its name"):
        build_deeplab(num_classes=3, backbone="resnet50", pretrained=str(tmp_path / name))


def test_basic_block_backbones_dilate_like_bottleneck_ones():
    """ResNet-18/34 (CPU runs, tests): stages 3 and 4 at stride 1, dilation 2 and 4 (first block of a
    stage at the previous dilation), output stride 8; ImageNet keys unchanged; other names refused."""
    net = DeepLabV2(num_classes=5, backbone="resnet18", norm="batch")
    assert net(torch.randn(1, 3, 65, 65)).shape == (1, 5, 9, 9)
    l3, l4 = net.backbone.layer3, net.backbone.layer4
    assert [l3[0].conv1.stride, l3[0].conv1.dilation, l3[1].conv2.dilation] == [(1, 1), (1, 1), (2, 2)]
    assert [l4[0].conv1.dilation, l4[0].conv2.dilation, l4[0].downsample[0].stride] == [(2, 2), (4, 4), (1, 1)]
    import torchvision
    theirs = set(torchvision.models.resnet18(weights=None).state_dict()) - {"fc.weight", "fc.bias"}
    assert set(net.backbone.state_dict()) == theirs
    with pytest.raises(VweError, match="resnet18, resnet34, resnet50, resnet101"):
        DeepLabV2(backbone="resnet152")


# ----------------------------------------------------------------------------------- param groups

def test_param_groups_partition_with_recipe_multipliers(imagenet_r101):
    _, model = imagenet_r101

    class Wrapped(nn.Module):  # what DDP looks like from outside: .module
        def __init__(self, m):
            super().__init__()
            self.module = m

    for m in (model, MSC(model), Wrapped(MSC(model))):
        groups = seg_param_groups(m, lr=2.5e-4, weight_decay=5e-4)
        assert [(g["name"], g["lr"], g["weight_decay"]) for g in groups] == [
            ("backbone", 2.5e-4, 5e-4), ("head_weight", 2.5e-3, 5e-4), ("head_bias", 5e-3, 0.0)]
        ids = [id(p) for g in groups for p in g["params"]]
        assert len(ids) == len(set(ids))
        assert set(ids) == {id(p) for p in model.parameters() if p.requires_grad}
        backbone_convs = [mod.weight for mod in model.backbone.modules() if isinstance(mod, nn.Conv2d)]
        assert len(backbone_convs) == 104  # ResNet-101: stem + 33 blocks x 3 + 4 downsample
        assert [id(p) for p in groups[0]["params"]] == [id(p) for p in backbone_convs]
        assert [id(p) for p in groups[1]["params"]] == [id(c.weight) for c in model.aspp.branches]
        assert [id(p) for p in groups[2]["params"]] == [id(c.bias) for c in model.aspp.branches]
    model.backbone.requires_grad_(False)
    try:
        assert [g["name"] for g in seg_param_groups(model, 1.0, 0.0)] == ["head_weight", "head_bias"]
    finally:
        model.backbone.requires_grad_(True)


# ------------------------------------------------------------------------------------ poly schedule

def _recipe_lrs(base: float, max_steps: int, every: int, power: float) -> list[float]:
    """What deeplab-pytorch's loop uses at iterations 1..max_steps: the scheduler is stepped with
    epoch=iteration after each optimizer step and only rewrites the lr when that iteration is a
    positive multiple of `every` not past max_steps; otherwise the group keeps its lr."""
    lr, used = base, []
    for iteration in range(1, max_steps + 1):
        used.append(lr)
        if iteration % every == 0 and iteration <= max_steps:
            lr = base * (1 - iteration / max_steps) ** power
    return used


def poly_lr(step: int, base: float, max_steps: int, power: float = 0.9, every: int = 10) -> float:
    return base * poly_factor(step, max_steps, power, every)


def test_poly_lr_matches_hand_formula_and_recipe_loop():
    base, T = 2.5e-4, 20000
    for step in (0, 1, 9, 10, 11, 19, 20, 12345, 19990, 19999):
        assert poly_lr(step, base, T) == pytest.approx(base * (1 - 10 * (step // 10) / T) ** 0.9, rel=1e-12)
    assert poly_lr(9, base, T) == base and poly_lr(10, base, T) < base
    assert poly_lr(19999, base, T) == pytest.approx(base * (10 / T) ** 0.9)
    assert poly_lr(20000, base, T) == 0.0 and poly_lr(25000, base, T) == 0.0
    for T, every in ((95, 10), (100, 10), (37, 1), (30, 7)):
        expected = _recipe_lrs(1.0, T, every, 0.9)
        assert [poly_lr(s, 1.0, T, 0.9, every) for s in range(T)] == pytest.approx(expected, rel=1e-12)


def _sgd(lr: float = 1.0) -> torch.optim.SGD:
    w, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    return torch.optim.SGD([{"params": [w], "lr": lr}, {"params": [b], "lr": 20 * lr}], lr=lr, momentum=0.9)


def test_scheduler_follows_poly_and_resumes_from_state_dict():
    T, every = 60, 10
    opt = _sgd(0.5)
    sched = PolySchedule(opt, T, 0.9, every)
    full, saved = [], None
    for step in range(T):
        full.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
        if step == 22:
            saved = (opt.state_dict(), sched.state_dict())
    assert [lr[0] for lr in full] == pytest.approx([poly_lr(s, 0.5, T, 0.9, every) for s in range(T)])
    assert [lr[1] for lr in full] == pytest.approx([poly_lr(s, 10.0, T, 0.9, every) for s in range(T)])
    # resume: scheduler state alone (a fresh optimizer at the base lr) and with the optimizer's state
    for with_opt in (False, True):
        opt2 = _sgd(0.5)
        sched2 = PolySchedule(opt2, T, 0.9, every)
        if with_opt:
            opt2.load_state_dict(saved[0])
        sched2.load_state_dict(saved[1])
        resumed = []
        for _ in range(23, T):
            resumed.append([g["lr"] for g in opt2.param_groups])
            opt2.step()
            sched2.step()
        assert sum(resumed, []) == pytest.approx(sum(full[23:], []))
        assert sched2.get_last_lr() == pytest.approx([g["lr"] for g in opt2.param_groups])


# ------------------------------------------------------------------------------------ MSC and loss

class _Stride8(nn.Module):
    """A stand-in for the network: logits at ceil(size / 8) (a strided conv, padding for the ceil)."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, classes, 8, stride=8)

    def forward(self, x):
        h, w = x.shape[-2:]
        return self.conv(F.pad(x, (0, -w % 8, 0, -h % 8)))


def test_msc_forward_outputs_and_max_fusion():
    torch.manual_seed(0)
    net, x = _Stride8(), torch.randn(2, 3, 64, 64)
    outs = msc_forward(net, x)
    assert [o.shape[-2:] for o in outs] == [(8, 8), (4, 4), (6, 6), (8, 8)]  # 1.0, 0.5, 0.75, max
    torch.testing.assert_close(outs[0], net(x))
    half = net(F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False))
    torch.testing.assert_close(outs[1], half)
    up = [F.interpolate(o, size=(8, 8), mode="bilinear", align_corners=False) for o in outs[1:3]]
    torch.testing.assert_close(outs[3], torch.maximum(outs[0], torch.maximum(up[0], up[1])))
    msc = MSC(net)
    assert len(msc.train()(x)) == 4
    torch.testing.assert_close(msc.eval()(x), outs[3])
    single = msc_forward(net, x, scales=())  # single scale: one output, one loss term
    assert len(single) == 1 and torch.equal(single[0], outs[0])


def _pil_resize(labels: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The recipe's resize_labels: each label map as a float PIL image, NEAREST."""
    return torch.stack([torch.from_numpy(np.array(
        Image.fromarray(lab.float().numpy()).resize((w, h), resample=Image.NEAREST))).long() for lab in labels])


def test_resize_labels_is_pils_nearest():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 21, (2, 321, 321), generator=g)
    labels[:, :, 300:] = 255
    for h, w in ((41, 41), (21, 21), (31, 31), (13, 8), (40, 50), (6, 12), (7, 14), (642, 400)):
        assert torch.equal(resize_labels(labels, (h, w)), _pil_resize(labels, h, w)), (h, w)
    # sizes where the closed form floor((i + 0.5) * in / out) and torch's nearest-exact pick other pixels
    small = torch.arange(64)[None, None].expand(1, 2, 64)
    assert resize_labels(small, (2, 6))[0, 0].tolist() == [5, 16, 26, 37, 47, 58]


def test_seg_loss_is_the_sum_of_per_output_cross_entropy():
    torch.manual_seed(0)
    outs = msc_forward(_Stride8(5), torch.randn(2, 3, 64, 64))
    labels = torch.randint(0, 5, (2, 64, 64))
    labels[0, :20] = 255
    labels[1, :, 50:] = 255
    loss = seg_loss(outs, labels)
    expected = sum(F.cross_entropy(o, _pil_resize(labels, *o.shape[-2:]), ignore_index=255) for o in outs)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    # an output whose labels are all ignored contributes 0, not NaN
    only_ignored = torch.full((1, 64, 64), 255)
    logits = torch.randn(1, 5, 8, 8, requires_grad=True)
    zero = seg_loss([logits], only_ignored)
    zero.backward()
    assert zero.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))


# ------------------------------------------------------------------------------------- prediction

def test_predict_probs_default_is_the_recipes_msc_eval():
    torch.manual_seed(0)
    net, x = _Stride8(), torch.randn(1, 3, 60, 44)
    msc_max = MSC(net).eval()(x)
    torch.testing.assert_close(predict_logits(net, x), msc_max)
    probs = predict_probs(net, x)
    expected = F.interpolate(msc_max, size=(60, 44), mode="bilinear", align_corners=False).softmax(1)
    torch.testing.assert_close(probs, expected)
    torch.testing.assert_close(probs.sum(1), torch.ones(1, 60, 44))


def test_predict_logits_flip_and_scales_without_one():
    torch.manual_seed(0)
    net, x = _Stride8(), torch.randn(1, 3, 64, 48)
    flipped = predict_logits(net, x, scales=(1.0,), flip=True)
    torch.testing.assert_close(flipped, torch.maximum(net(x), net(x.flip(-1)).flip(-1)))
    # no 1.0 scale: fused at ceil(H/8) x ceil(W/8)
    fused = predict_logits(net, x, scales=(0.5, 1.5))
    assert fused.shape == (1, 4, 8, 6)
    at = [F.interpolate(net(F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)),
                        size=(8, 6), mode="bilinear", align_corners=False) for s in (0.5, 1.5)]
    torch.testing.assert_close(fused, torch.maximum(*at))


def test_crf_snaps_noisy_probabilities_to_the_two_regions():
    h, w = 24, 32
    image = np.zeros((h, w, 3), np.uint8)
    image[:, w // 2:] = 255
    expected = np.zeros((h, w), np.int64)
    expected[:, w // 2:] = 1
    p1 = np.where(expected == 1, 0.7, 0.3).astype(np.float32)
    p1[8:12, 4:8] = 0.6    # a blob on the dark side leaning to class 1
    p1[14:18, 22:26] = 0.4  # and one on the bright side leaning to class 0
    probs = np.stack([1 - p1, p1])
    assert (probs.argmax(0) != expected).sum() == 32
    q = dense_crf(image, probs)
    assert q.shape == (2, h, w) and q.dtype == np.float32
    np.testing.assert_allclose(q.sum(0), 1.0, atol=1e-5)
    assert np.array_equal(crf_labels(image, probs), expected)
    with pytest.raises(ValueError, match="uint8"):
        dense_crf(image.astype(np.float32), probs)


def test_recipe_crf_image_wraps_the_mean_subtracted_bgr_image():
    image = np.array([[[0, 0, 0], [255, 128, 104], [123, 117, 105]]], np.uint8)  # RGB
    out = recipe_crf_image(image)
    # B - 104.008, G - 116.669, R - 122.675, truncated toward zero, modulo 256
    assert out.tolist() == [[[152, 140, 134], [0, 11, 132], [0, 0, 0]]]
    assert out.dtype == np.uint8


def test_build_none_is_random_backbone_and_recipe_head():
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="diverges"):
        model = build_deeplab(num_classes=3, backbone="resnet50", pretrained="none")
    assert model.load_report is None
    assert math.isclose(model.aspp.branches[0].bias.abs().sum().item(), 0.0)
