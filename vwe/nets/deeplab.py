"""DeepLabV2 (dilated ResNet at output stride 8 + ASPP) and the pure pieces of the deeplab-pytorch
recipe: multi-scale inputs (MSC) and their loss, per-group learning rates, the step-wise poly schedule,
multi-scale test prediction and DenseCRF post-processing. docs/segmentation.md says where each piece
comes from and where vwe departs from it."""
from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from vwe.nets.backbone import (FROZEN_NORMS, NORMS, LoadReport, fetch_imagenet_weights, load_backbone_weights,
                               norm_layer, read_state_dict)
from vwe.runtime.errors import SegmentationWeightsError, VweError

SEG_BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101")  # 18/34: small networks for CPU runs and tests
ASPP_RATES = (6, 12, 18, 24)
TRAIN_SCALES = (0.5, 0.75)   # MSC: the extra input scales beside 1.0
TEST_SCALES = (1.0, 0.5, 0.75)
IGNORE_INDEX = 255
OUTPUT_STRIDE = 8
RECIPE_MEAN_BGR = (104.008, 116.669, 122.675)  # configs/voc12.yaml IMAGE.MEAN, caffe's 0-255 BGR


# ------------------------------------------------------------------------------------------ network

class DilatedResNet(nn.Module):
    """torchvision ResNet-50/101 trunk (no avgpool/fc) at output stride 8: stages 3 and 4 keep stage 2's
    resolution with dilation 2 and 4. Module names follow torchvision, so its ImageNet state dicts load
    through vwe.nets.backbone.load_backbone_weights. Unlike the CAM backbone the stem trains (the recipe
    puts every backbone convolution in its 1x group)."""

    def __init__(self, name: str = "resnet101", norm: str = "frozen_all") -> None:
        super().__init__()
        if name not in SEG_BACKBONES:
            raise VweError(f"seg.backbone must be one of {', '.join(SEG_BACKBONES)}, got {name!r}")
        if norm not in NORMS:
            raise VweError(f"seg.norm must be one of {', '.join(NORMS)}, got {norm!r}")
        basic = name in ("resnet18", "resnet34")  # torchvision refuses to dilate BasicBlock: done below
        resnet = getattr(torchvision.models, name)(weights=None, norm_layer=norm_layer(norm),
                                                   replace_stride_with_dilation=None if basic else [False, True, True])
        if basic:
            _dilate_basic(resnet.layer3, 2)
            _dilate_basic(resnet.layer4, 4)
        self.name, self.norm = name, norm
        self.conv1, self.bn1, self.relu, self.maxpool = resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4
        self.out_channels = resnet.fc.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def _dilate_basic(layer: nn.Sequential, dilation: int) -> None:
    """A BasicBlock stage at stride 1 and `dilation`, as torchvision's replace_stride_with_dilation does
    for Bottleneck stages: the first block's strided convolution (and its shortcut) keeps the previous
    stage's dilation, the rest use `dilation` (same parameters, so ImageNet weights still load)."""
    for i, block in enumerate(layer):
        first = dilation // 2 if i == 0 else dilation
        block.conv1.stride, block.conv1.dilation, block.conv1.padding = (1, 1), (first, first), (first, first)
        block.conv2.dilation, block.conv2.padding = (dilation, dilation), (dilation, dilation)
        if block.downsample is not None:
            block.downsample[0].stride = (1, 1)


class ASPP(nn.Module):
    """DeepLab v2 ASPP: parallel 3x3 convolutions (with bias) at the given dilations, outputs summed."""

    def __init__(self, in_channels: int, num_classes: int, rates: Sequence[int] = ASPP_RATES) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Conv2d(in_channels, num_classes, 3, padding=r, dilation=r, bias=True) for r in rates)
        for conv in self.branches:
            nn.init.normal_(conv.weight, mean=0.0, std=0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.branches[0](x)
        for conv in self.branches[1:]:
            out = out + conv(x)
        return out


class DeepLabV2(nn.Module):
    """Dilated ResNet (output stride 8) + ASPP: (B, 3, H, W) -> logits (B, C, ceil(H/8), ceil(W/8))."""

    def __init__(self, num_classes: int = 21, backbone: str = "resnet101", norm: str = "frozen_all",
                 rates: Sequence[int] = ASPP_RATES) -> None:
        super().__init__()
        self.backbone = DilatedResNet(backbone, norm)
        self.aspp = ASPP(self.backbone.out_channels, num_classes, rates)
        self.load_report: LoadReport | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.aspp(self.backbone(x))


class MSC(nn.Module):
    """Multi-scale inputs around a base network. Training: the list of msc_forward (every output gets a
    loss); eval: the fused (max) logits. Wrap this module, not the base, in DDP: the base runs several
    times per forward, which DDP only accepts inside one forward call."""

    def __init__(self, base: nn.Module, scales: Sequence[float] = TRAIN_SCALES) -> None:
        super().__init__()
        self.base = base
        self.scales = tuple(scales)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor] | torch.Tensor:
        outs = msc_forward(self.base, x, self.scales)
        return outs if self.training else outs[-1]


# ------------------------------------------------------------------------------------------ weights

def _torchvision_segmentation_files() -> set[str]:
    names = set()
    seg = torchvision.models.segmentation
    for attr in dir(seg):
        if attr.endswith("_Weights"):
            names.update(w.url.rsplit("/", 1)[-1] for w in getattr(seg, attr))
    return names


# torchvision's segmentation heads (deeplabv3_*, fcn_*, lraspp_*) and deeplab-pytorch's COCO/VOC
# caffemodel conversions, by file name or weights-enum name
_SEG_NAME = re.compile(r"COCO_WITH_VOC_LABELS|^(deeplabv3|fcn|lraspp)_(resnet|mobilenet)"
                       r"|^deeplabv1_resnet101-coco|^deeplabv2_resnet101_msc-", re.IGNORECASE)
_LEAK_MESSAGE = ("{what} looks like segmentation weights ({why}): torchvision's deeplabv3/fcn/lraspp "
                 "COCO_WITH_VOC_LABELS weights (and deeplab-pytorch's COCO/VOC models) were trained with "
                 "pixel-level masks, VOC's classes included, so initialising from them leaks full "
                 "supervision into a weakly-supervised result. Use seg.pretrained: imagenet (torchvision's "
                 "ImageNet classification ResNet) or a path to such a state dict")


def refuse_segmentation_name(name: str) -> None:
    """Raise SegmentationWeightsError when a weights name or file names torchvision's (or
    deeplab-pytorch's) segmentation weights."""
    base = Path(name).name
    if base in _torchvision_segmentation_files() or _SEG_NAME.search(base):
        raise SegmentationWeightsError(_LEAK_MESSAGE.format(what=name, why="by its name"))


def refuse_segmentation_state(state: dict[str, torch.Tensor], source: str) -> None:
    """Raise SegmentationWeightsError for a state dict with a torchvision segmentation layout:
    `aux_classifier.*`, or `backbone.*` beside a nested `classifier.<i>.*` head (vwe's own CAM network
    has a flat `classifier.weight`, and is not refused here)."""
    keys = [k[7:] if k.startswith("module.") else k for k in state]
    if any(k.startswith("aux_classifier.") for k in keys):
        raise SegmentationWeightsError(_LEAK_MESSAGE.format(what=source, why="it has aux_classifier.* keys"))
    if any(k.startswith("backbone.") for k in keys) and any(re.match(r"classifier\.[^.]+\.", k) for k in keys):
        raise SegmentationWeightsError(
            _LEAK_MESSAGE.format(what=source, why="backbone.* keys with a classifier.<i>.* head"))


def read_init_weights(pretrained: str, backbone: str) -> tuple[dict[str, torch.Tensor], str] | None:
    """The backbone's initial weights per `seg.pretrained`: none (None) | imagenet (torchvision's
    ImageNet file from the torch hub cache, see docs/model.md) | a path to a torchvision-named ImageNet
    ResNet state dict. Segmentation weights are refused, by name before reading, by keys after."""
    if pretrained == "none":
        return None
    refuse_segmentation_name(pretrained)
    path = fetch_imagenet_weights(backbone) if pretrained == "imagenet" else Path(pretrained).expanduser()
    state = read_state_dict(path)
    refuse_segmentation_state(state, str(path))
    return state, str(path)


def build_deeplab(num_classes: int = 21, backbone: str = "resnet101", pretrained: str = "imagenet",
                  norm: str = "frozen_all", rates: Sequence[int] = ASPP_RATES) -> DeepLabV2:
    """DeepLabV2 with ImageNet backbone weights (or none / a local file) and the recipe's ASPP init;
    `model.load_report` says what the weights file did not cover."""
    if backbone not in SEG_BACKBONES:  # before any file is read
        raise VweError(f"seg.backbone must be one of {', '.join(SEG_BACKBONES)}, got {backbone!r}")
    init = read_init_weights(pretrained, backbone)
    if init is None and norm in FROZEN_NORMS:
        warnings.warn(f"seg.pretrained=none with seg.norm={norm}: a random ResNet under fixed BatchNorm "
                      "statistics diverges in training; use norm batch, syncbatch or group", stacklevel=2)
    model = DeepLabV2(num_classes, backbone, norm, rates)
    if init is not None:
        # DilatedResNet has Backbone's name/norm/state-dict interface
        model.load_report = load_backbone_weights(model.backbone, *init)  # type: ignore[arg-type]
    return model


# ------------------------------------------------------------------------------------ MSC and loss

def msc_forward(net: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                scales: Sequence[float] = TRAIN_SCALES) -> list[torch.Tensor]:
    """[logits at 1.0, logits at each scale (their own size), pixel-wise max of all] where the smaller
    maps are bilinearly resized to the 1.0 map before the max; the inputs are scaled bilinearly.
    No scales: [logits at 1.0] (single-scale training, one loss term)."""
    full = net(x)
    if not scales:
        return [full]
    size = full.shape[-2:]
    scaled = [net(F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)) for s in scales]
    resized = [full] + [F.interpolate(l, size=size, mode="bilinear", align_corners=False) for l in scaled]
    return [full, *scaled, torch.stack(resized).amax(dim=0)]


def _pil_nearest_index(n_in: int, n_out: int) -> list[int]:
    """Source index of each output pixel under PIL's NEAREST resize: the pixel-centre position
    (i + 0.5) * n_in / n_out, accumulated in double precision one output pixel at a time and truncated,
    as Pillow's ImagingScaleAffine does (it differs from the closed form at exact integers)."""
    step = n_in / n_out
    pos, index = step * 0.5, []
    for _ in range(n_out):
        index.append(min(int(pos), n_in - 1))
        pos += step
    return index


def resize_labels(labels: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """(B, H, W) integer labels -> (B, h, w) int64, picking pixels exactly as the recipe's resize_labels
    (PIL NEAREST; torch's 'nearest' and 'nearest-exact' pick other pixels for some sizes)."""
    h, w = int(size[0]), int(size[1])
    if tuple(labels.shape[-2:]) == (h, w):
        return labels.long()
    rows = torch.tensor(_pil_nearest_index(labels.shape[-2], h), device=labels.device)
    cols = torch.tensor(_pil_nearest_index(labels.shape[-1], w), device=labels.device)
    return labels.long().index_select(-2, rows).index_select(-1, cols)


def seg_loss(outputs: Sequence[torch.Tensor], labels: torch.Tensor,
             ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Sum over outputs of the cross entropy against labels resized to each output, each averaged over
    its non-ignored pixels; an output with every pixel ignored adds 0 (not NaN). Float32."""
    total = outputs[0].new_zeros((), dtype=torch.float32)
    for logits in outputs:
        target = resize_labels(labels, logits.shape[-2:]).to(logits.device)
        summed = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="sum")
        total = total + summed / (target != ignore_index).sum().clamp(min=1)
    return total


# ----------------------------------------------------------------------------------- optimisation

def seg_param_groups(model: nn.Module, lr: float, weight_decay: float, head_lr_mult: float = 10.0,
                     head_bias_lr_mult: float = 20.0) -> list[dict]:
    """SGD groups of the recipe: `backbone` (every trainable backbone parameter: with frozen BatchNorm
    the convolution weights) at lr with weight decay; `head_weight` (ASPP weights) at 10x lr with weight
    decay; `head_bias` (ASPP biases) at 20x lr without. Only parameters with requires_grad; empty groups
    are left out. Accepts an MSC and/or DDP-wrapped model."""
    net = getattr(model, "module", model)
    net = getattr(net, "base", net)
    if not isinstance(getattr(net, "aspp", None), ASPP):
        raise TypeError(f"seg_param_groups needs a DeepLabV2 (optionally in MSC/DDP), got {type(net).__name__}")
    head_w = [c.weight for c in net.aspp.branches if c.weight.requires_grad]
    head_b = [c.bias for c in net.aspp.branches if c.bias is not None and c.bias.requires_grad]
    head_ids = {id(p) for p in net.aspp.parameters()}
    backbone = [p for p in net.parameters() if p.requires_grad and id(p) not in head_ids]
    groups = [{"name": "backbone", "params": backbone, "lr": lr, "weight_decay": weight_decay},
              {"name": "head_weight", "params": head_w, "lr": lr * head_lr_mult, "weight_decay": weight_decay},
              {"name": "head_bias", "params": head_b, "lr": lr * head_bias_lr_mult, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


# --------------------------------------------------------------------------------------- inference

@torch.no_grad()
def predict_logits(net: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                   scales: Sequence[float] = TEST_SCALES, flip: bool = False,
                   output_stride: int = OUTPUT_STRIDE) -> torch.Tensor:
    """Multi-scale (optionally + horizontal flip) logits fused by pixel-wise max at the resolution of the
    scale-1.0 logits (ceil(H/stride), ceil(W/stride) when 1.0 is not among the scales). With the default
    scales and no flip this is the recipe's MSC eval output."""
    h, w = images.shape[-2:]
    ref = (math.ceil(h / output_stride), math.ceil(w / output_stride))
    maps = []
    for s in scales:
        x = images if s == 1.0 else F.interpolate(images, scale_factor=s, mode="bilinear", align_corners=False)
        maps.append(net(x))
        if s == 1.0:
            ref = tuple(maps[-1].shape[-2:])
        if flip:
            maps.append(net(x.flip(-1)).flip(-1))
    resized = [m if tuple(m.shape[-2:]) == ref else
               F.interpolate(m, size=ref, mode="bilinear", align_corners=False) for m in maps]
    return torch.stack(resized).amax(dim=0)


def logits_to_probs(logits: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """(B, C, h, w) logits -> (B, C, H, W) probabilities: bilinear resize, then softmax over classes."""
    up = F.interpolate(logits.float(), size=tuple(size), mode="bilinear", align_corners=False)
    return up.softmax(dim=1)


@torch.no_grad()
def predict_probs(net: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                  scales: Sequence[float] = TEST_SCALES, flip: bool = False) -> torch.Tensor:
    """(B, 3, H, W) normalised images -> (B, C, H, W) class probabilities (float32) at image size."""
    return logits_to_probs(predict_logits(net, images, scales, flip), images.shape[-2:])


def dense_crf(image: np.ndarray, probs: np.ndarray, iterations: int = 10, pos_w: float = 3.0,
              pos_xy_std: float = 1.0, bi_w: float = 4.0, bi_xy_std: float = 67.0,
              bi_rgb_std: float = 3.0) -> np.ndarray:
    """DenseCRF on an (H, W, 3) uint8 image and (C, H, W) probabilities with the recipe's settings:
    unary -log(p), Gaussian (sxy pos_xy_std, compat pos_w) and bilateral (sxy bi_xy_std, srgb bi_rgb_std,
    compat bi_w) Potts kernels, `iterations` mean-field steps. Returns Q, (C, H, W) float32."""
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax
    c, h, w = probs.shape
    if image.shape != (h, w, 3) or image.dtype != np.uint8:
        raise ValueError(f"image {image.shape} {image.dtype} must be uint8 (H, W, 3) matching probs {probs.shape}")
    crf = dcrf.DenseCRF2D(w, h, c)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs.astype(np.float32))))
    crf.addPairwiseGaussian(sxy=pos_xy_std, compat=pos_w)
    # the extension wants a C-contiguous, writable buffer
    crf.addPairwiseBilateral(sxy=bi_xy_std, srgb=bi_rgb_std, rgbim=np.require(image, requirements=("C", "W")),
                             compat=bi_w)
    return np.asarray(crf.inference(iterations), dtype=np.float32).reshape(c, h, w)


def crf_labels(image: np.ndarray, probs: np.ndarray, **settings: float) -> np.ndarray:
    """argmax over classes of dense_crf(image, probs, **settings): (H, W) int64 labels."""
    return dense_crf(image, probs, **settings).argmax(axis=0)


def recipe_crf_image(image: np.ndarray, mean_bgr: Sequence[float] = RECIPE_MEAN_BGR) -> np.ndarray:
    """The image deeplab-pytorch's `crf` command hands to DenseCRF, for comparisons with its numbers:
    the mean-subtracted BGR float image cast to uint8, i.e. truncated toward zero and wrapped modulo 256
    (negative values become large ones). (H, W, 3) uint8 RGB in, (H, W, 3) uint8 BGR out."""
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 (H, W, 3), got {image.shape} {image.dtype}")
    shifted = image[..., ::-1].astype(np.float32) - np.asarray(mean_bgr, np.float32)
    # numpy's float -> uint8 cast wraps on common platforms but is undefined for negatives: spell it out
    return (np.trunc(shifted).astype(np.int64) % 256).astype(np.uint8)
