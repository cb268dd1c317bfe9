"""torchvision ResNet backbone: output stride 16, frozen stem, a choice of normalisation, optional
detach after stage 2, per-stage gradient checkpointing, and weights from the local torch cache or a file."""
from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint

from vwe.runtime.errors import CheckpointError, VweError

log = logging.getLogger(__name__)

BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101")
NORMS = ("frozen", "frozen_all", "batch", "syncbatch", "group")
FROZEN_NORMS = ("frozen", "frozen_all")  # running statistics never updated; BN foldable at inference
PER_SAMPLE_NORMS = (*FROZEN_NORMS, "group")  # each sample normalised on its own, whatever the batch
GROUPS = 32  # GroupNorm groups; divides every ResNet width (64 ... 2048)
# Keys of a torchvision state dict that a backbone never loads or never needs.
_IGNORED_PREFIXES = ("fc.",)


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm that always normalises with its running statistics (eval mode, also while training) and
    never updates them. With `train_affine` (model.norm=frozen, the published code's "fixed" BatchNorm)
    gamma/beta are trainable parameters; without it (model.norm=frozen_all) they are buffers and the
    layer is a fixed per-channel affine map. State-dict keys are BatchNorm's either way."""

    def __init__(self, num_features: int, eps: float = 1e-5, train_affine: bool = True) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.train_affine = train_affine
        if train_affine:
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))
        else:
            self.register_buffer("weight", torch.ones(num_features))
            self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

        self._kept: dict[str, tuple] = {}

    def scale_shift(self, inv_std: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The equivalent affine map y = x * scale + shift (per channel)."""
        scale = self.weight * ((self.running_var + self.eps).rsqrt() if inv_std is None else inv_std)
        return scale, self.bias - self.running_mean * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, shift = self._affine(x.dtype)
        # one fused op: a single output tensor (x * scale + shift would make a full-size temporary)
        return torch.addcmul(shift, x, scale)

    def _affine(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """scale and shift as (1, C, 1, 1) tensors of `dtype`. What cannot change from one forward to the
        next is kept, to the same bits: the whole map when nothing differentiates it (frozen_all, or autograd
        off), else the inverse standard deviation. A step of DeepLab on a GPU is bound by how fast the host
        launches kernels, and this map took ten of them per layer and forward where one remains."""
        stats = (self.running_mean, self.running_var)
        if torch.compiler.is_compiling():  # the compiler folds what is constant itself
            return self._shaped(self.scale_shift(), dtype)
        if self.train_affine and torch.is_grad_enabled():  # gamma/beta learn: their part is recomputed
            inv_std = self._keep("inv_std", stats[1:], lambda: (self.running_var + self.eps).rsqrt())
            return self._shaped(self.scale_shift(inv_std), dtype)
        # inference tensors (made under inference_mode) cannot be saved for a backward: kept apart
        return self._keep(f"map {dtype} {torch.is_inference_mode_enabled()}", (self.weight, self.bias, *stats),
                          lambda: self._shaped(self.scale_shift(), dtype))

    @staticmethod
    def _shaped(scale_shift: tuple[torch.Tensor, torch.Tensor], dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        return tuple(t.view(1, -1, 1, 1).to(dtype) for t in scale_shift)

    def _keep(self, name: str, sources: tuple[torch.Tensor, ...], compute: Callable[[], Any]) -> Any:
        """compute()'s value, kept until one of `sources` is replaced (another tensor, or other memory: a move
        to another device, a DeepSpeed gather) or written in place (load_state_dict, a broadcast: its version
        counter)."""
        try:
            stamp = tuple((t._version, t.data_ptr()) for t in sources)
        except RuntimeError:  # an inference tensor (made under inference_mode) has no version counter
            return compute()
        kept = self._kept.get(name)
        if kept is None or kept[1] != stamp or any(a is not b for a, b in zip(kept[0], sources)):
            kept = self._kept[name] = (sources, stamp, compute())
        return kept[2]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        state_dict.pop(prefix + "num_batches_tracked", None)  # written by a trainable BatchNorm
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, train_affine={self.train_affine}"


def only_frozen_buffers(model: nn.Module) -> bool:
    """Whether every buffer of `model` is a frozen BatchNorm's (statistics and affine that never change in
    training); a memory bank or a trainable BatchNorm's running statistics are buffers that do."""
    frozen = {id(b) for m in model.modules() if isinstance(m, FrozenBatchNorm2d) for b in m.buffers(recurse=False)}
    return all(id(b) in frozen for b in model.buffers())


def norm_layer(norm: str) -> Callable[[int], nn.Module]:
    """The per-channel normalisation constructor for `model.norm`."""
    if norm == "frozen":
        return FrozenBatchNorm2d
    if norm == "frozen_all":
        return lambda c: FrozenBatchNorm2d(c, train_affine=False)
    if norm == "batch":
        return nn.BatchNorm2d
    if norm == "syncbatch":
        return nn.SyncBatchNorm
    if norm == "group":
        return lambda c: nn.GroupNorm(GROUPS, c)
    raise VweError(f"model.norm must be one of {', '.join(NORMS)}, got {norm!r}")


def _set_output_stride_16(resnet: torchvision.models.ResNet) -> None:
    """Last stage keeps the third stage's resolution: stride 1 in its first block, no dilation."""
    first = resnet.layer4[0]
    strided = first.conv2 if isinstance(first, torchvision.models.resnet.Bottleneck) else first.conv1
    strided.stride = (1, 1)
    if first.downsample is not None:
        first.downsample[0].stride = (1, 1)


@contextlib.contextmanager
def _no_running_stat_update(module: nn.Module):
    """During a checkpoint's recomputation, BatchNorm must not fold the same batch into its running
    statistics a second time: momentum 0 leaves them unchanged; the batch counter is restored."""
    saved = []
    for m in module.modules():
        if isinstance(m, _BatchNorm) and m.track_running_stats:
            counter = m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None
            saved.append((m, m.momentum, counter))
            m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum, counter in saved:
            m.momentum = momentum
            if counter is not None:
                m.num_batches_tracked.copy_(counter)


class Backbone(nn.Module):
    """ResNet trunk (no avgpool/fc) returning the last stage's map at output stride 16.

    Module names follow torchvision (conv1, bn1, layer1..layer4), so torchvision state dicts load as is.
    """

    def __init__(self, name: str = "resnet50", norm: str = "frozen", detach_stage2: bool = False,
                 grad_checkpointing: bool = False, channels_last: bool = False) -> None:
        super().__init__()
        if name not in BACKBONES:
            raise VweError(f"model.backbone must be one of {', '.join(BACKBONES)}, got {name!r}")
        resnet = getattr(torchvision.models, name)(weights=None, norm_layer=norm_layer(norm))
        _set_output_stride_16(resnet)
        self.name, self.norm, self.detach_stage2 = name, norm, detach_stage2
        self.grad_checkpointing = grad_checkpointing
        self.channels_last = channels_last
        self.conv1, self.bn1, self.relu, self.maxpool = resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4
        self.out_channels = resnet.fc.in_features
        self.freeze()

    def frozen_modules(self) -> list[nn.Module]:
        """The parts that never learn: the stem, and stages 1-2 when their output is detached."""
        parts: list[nn.Module] = [self.conv1, self.bn1]
        if self.detach_stage2:
            parts += [self.layer1, self.layer2]
        return parts

    def freeze(self) -> None:
        """requires_grad=False on everything that gets no gradient (DDP then needs no unused-parameter
        search), BatchNorm gamma/beta of those parts included."""
        for part in self.frozen_modules():
            for p in part.parameters():
                p.requires_grad_(False)

    def stages(self) -> list[nn.Sequential]:
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i, stage in enumerate(self.stages()):
            x = self._run_stage(stage, x)
            if i == 1 and self.detach_stage2:
                x = x.detach()
        return x

    def _run_stage(self, stage: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        # Whole stages, not single blocks, are the checkpoint segments: a bottleneck block's input is
        # two thirds of what the block saves for backward, so per-block segments would keep most of it.
        if not (self.grad_checkpointing and self.training and torch.is_grad_enabled()):
            return stage(x)
        if not x.requires_grad and not any(p.requires_grad for p in stage.parameters()):
            return stage(x)  # a frozen stage saves nothing for backward anyway
        return checkpoint(stage, x, use_reentrant=False,
                          context_fn=lambda: (contextlib.nullcontext(), _no_running_stat_update(stage)))


# ----------------------------------------------------------------------------------------- weights

@dataclass
class LoadReport:
    """What a weights file did not cover (missing) and what it held that the backbone has no use for."""
    source: str
    loaded: int = 0
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)


def _weights_enum(name: str):
    return getattr(torchvision.models, {"resnet18": "ResNet18_Weights", "resnet34": "ResNet34_Weights",
                                        "resnet50": "ResNet50_Weights", "resnet101": "ResNet101_Weights"}[name])


def imagenet_weights_file(name: str) -> tuple[Path, str]:
    """Where torchvision's ImageNet weights (IMAGENET1K_V1, the ones the paper used) for `name` live in
    the local torch hub cache, and their download URL."""
    url = _weights_enum(name).IMAGENET1K_V1.url
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1], url


def fetch_imagenet_weights(name: str) -> Path:
    """The cached ImageNet weights file, downloaded when absent and the network allows it."""
    path, url = imagenet_weights_file(name)
    if path.is_file():
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(path), hash_prefix=path.stem.rsplit("-", 1)[-1],
                                       progress=False)
    except Exception as e:  # no network, proxy refusal, hash mismatch: all end the same way
        raise CheckpointError(
            f"ImageNet weights for {name} are not in the torch cache and could not be downloaded ({e}). "
            f"Expected the file {path.name} in {path.parent} (the torch hub cache; set TORCH_HOME to "
            f"move it): download {url} there, or set model.pretrained to a local .pth/.safetensors "
            f"state dict, or to 'none'") from None
    return path


def weights_only_refusal(e: Exception) -> str:
    """torch.load's error, without its advice to retry with weights_only=False: that would run whatever
    code the file carries, and a weights file never needs it."""
    text = str(e)
    if "weights_only" not in text:
        return text
    first = next((line.strip() for line in text.splitlines() if line.strip()
                  and "weights_only" not in line and "Weights only load failed" not in line
                  and not line.strip().startswith(("(1)", "(2)", "Please file", "Check the documentation"))), "")
    reason = first.removeprefix("WeightsUnpickler error: ").strip()
    return ("it holds more than tensors (pickled objects, refused: only plain state dicts are read)"
            + (f": {reason}" if reason else ""))


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A .safetensors or .pth/.pt state dict (no pickled code: weights_only=True)."""
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read weights file {path}: {weights_only_refusal(e)}") from None
    if isinstance(state, dict) and len(state) == 1 and isinstance(next(iter(state.values())), dict):
        state = next(iter(state.values()))  # {"state_dict": {...}} / {"model": {...}} wrappers
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors (torchvision key names)")
    return state


def _ignorable(key: str, norm: str) -> bool:
    if key.startswith(_IGNORED_PREFIXES) or key.endswith("num_batches_tracked"):
        return True
    # GroupNorm keeps only the affine part of a BatchNorm checkpoint
    return norm == "group" and key.endswith(("running_mean", "running_var"))


def load_backbone_weights(backbone: Backbone, state: dict[str, torch.Tensor], source: str) -> LoadReport:
    """Copy a torchvision-named ResNet state dict into the backbone. Shape mismatches are refused
    (CheckpointError naming the key); missing and unexpected keys are logged and returned."""
    own = backbone.state_dict()
    state = {k[7:] if k.startswith("module.") else k: v for k, v in state.items()}
    report = LoadReport(source)
    usable = {}
    for key, value in state.items():
        if key not in own:
            if not _ignorable(key, backbone.norm):
                report.unexpected.append(key)
            continue
        if tuple(value.shape) != tuple(own[key].shape):
            raise CheckpointError(f"{source}: '{key}' has shape {tuple(value.shape)}, the {backbone.name} "
                                  f"backbone expects {tuple(own[key].shape)} (weights of another model?)")
        usable[key] = value
    report.missing = [k for k in own if k not in usable and not _ignorable(k, backbone.norm)]
    if not usable:
        raise CheckpointError(f"{source}: no key matches the {backbone.name} backbone (expected torchvision "
                              f"names such as 'conv1.weight', 'layer1.0.conv1.weight')")
    backbone.load_state_dict(usable, strict=False)
    report.loaded = len(usable)
    if report.missing:
        log.warning("%s: %d backbone keys missing, left at their initial values: %s", source,
                    len(report.missing), ", ".join(report.missing[:10]))
    if report.unexpected:
        log.warning("%s: %d unexpected keys ignored: %s", source, len(report.unexpected),
                    ", ".join(report.unexpected[:10]))
    return report


def build_backbone(name: str, pretrained: str = "none", norm: str = "frozen", detach_stage2: bool = False,
                   grad_checkpointing: bool = False, channels_last: bool = False
                   ) -> tuple[Backbone, LoadReport | None]:
    """A Backbone with weights per `model.pretrained`: none | imagenet | path to a state dict."""
    backbone = Backbone(name, norm, detach_stage2, grad_checkpointing, channels_last)
    if pretrained == "none":
        if norm in FROZEN_NORMS:
            warnings.warn(f"model.pretrained=none with model.norm={norm}: random weights under fixed "
                          "BatchNorm statistics diverge in training; use norm batch, syncbatch or group",
                          stacklevel=2)
        return backbone, None
    path = fetch_imagenet_weights(name) if pretrained == "imagenet" else Path(pretrained).expanduser()
    report = load_backbone_weights(backbone, read_state_dict(path), str(path))
    return backbone, report


# ----------------------------------------------------------------------------------- BN folding

@torch.no_grad()
def _fold_into(conv: nn.Conv2d, bn: FrozenBatchNorm2d) -> None:
    scale, shift = bn.scale_shift()
    conv.weight.mul_(scale.view(-1, 1, 1, 1).to(conv.weight.dtype))
    bias = shift if conv.bias is None else conv.bias * scale + shift
    conv.bias = nn.Parameter(bias.to(conv.weight.dtype), requires_grad=conv.weight.requires_grad)


def fold_frozen_bn(model: nn.Module) -> int:
    """Fold every frozen BatchNorm that directly follows a convolution into that convolution (weight
    scaled, bias added) and replace it by Identity, in place. For inference: the state dict changes
    (conv biases appear, BN keys go), so load weights before folding. Returns the number folded."""
    folded = 0
    for module in list(model.modules()):
        for i in range(1, 4):  # torchvision's conv{i}/bn{i} pairs (stem and residual blocks)
            conv, bn = getattr(module, f"conv{i}", None), getattr(module, f"bn{i}", None)
            if isinstance(conv, nn.Conv2d) and isinstance(bn, FrozenBatchNorm2d):
                _fold_into(conv, bn)
                setattr(module, f"bn{i}", nn.Identity())
                folded += 1
        if isinstance(module, nn.Sequential):  # downsample = Sequential(conv, bn)
            for j in range(len(module) - 1):
                if isinstance(module[j], nn.Conv2d) and isinstance(module[j + 1], FrozenBatchNorm2d):
                    _fold_into(module[j], module[j + 1])
                    module[j + 1] = nn.Identity()
                    folded += 1
    return folded
