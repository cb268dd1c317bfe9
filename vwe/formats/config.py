"""Typed experiment configuration: dataclass schema, YAML loading, dotted overrides, strict validation."""
from __future__ import annotations

import dataclasses
import difflib
import errno
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vwe.runtime.errors import ConfigError
from vwe.runtime.files import long_component, os_cause, path_problem


def _opt(default: Any, *, choices: tuple | None = None, min: float | None = None,
         max: float | None = None, doc: str = "", nonfinite: bool = False) -> Any:
    """A dataclass field carrying validation metadata. Float fields refuse NaN and +-Inf unless
    `nonfinite` is true (and the doc then says what they mean)."""
    meta = {"choices": choices, "min": min, "max": max, "doc": doc, "nonfinite": nonfinite}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DataConfig:
    root: str = _opt("data/shards", doc="where {split}.json indexes and their shards are: a folder, an http(s) "
                                        "URL, or a pipe: command with {name} (docs/data.md)")
    train_split: str = _opt("train_aug", doc="split the network trains on")
    infer_split: str = _opt("train", doc="split CAMs are produced and evaluated for")
    crop_size: int = _opt(512, min=16, doc="square random crop (zero padded)")
    long_side: list[int] = _opt([320, 640], doc="resize so the long side is uniform in [lo, hi]")
    flip: bool = _opt(True, doc="random horizontal flip")
    resize: str = _opt("bicubic", choices=("bicubic", "bilinear"),
                       doc="image resize (training and every inference scale), antialiased; bicubic = PIL's, as published")
    num_workers: int = _opt(2, min=0, doc="loader workers per rank (training; inference uses infer.num_workers)")
    worker_kind: str = _opt("process", choices=("process", "thread"),
                            doc="loader workers as DataLoader processes, or as threads of the rank's process "
                                "(measured faster; docs/data.md)")
    shuffle_buffer: int = _opt(1000, min=0, doc="samples held for shuffling in the training stream")
    on_corrupt: str = _opt("error", choices=("error", "skip"), doc="corrupt sample: stop, or count and skip")
    verify_shards: bool = _opt(True, doc="check each shard's SHA-256 against its index before use")


@dataclass
class ModelConfig:
    backbone: str = _opt("resnet50", choices=("resnet18", "resnet34", "resnet50", "resnet101"),
                         doc="torchvision ResNet at output stride 16")
    pretrained: str = _opt("imagenet", doc="none | imagenet | path to a .pth/.safetensors state dict")
    norm: str = _opt("frozen", choices=("frozen", "frozen_all", "batch", "syncbatch", "group"),
                     doc="frozen: ImageNet BN statistics, trained gamma/beta (the paper); frozen_all: "
                         "affine frozen too; batch/syncbatch/group: trainable norm, from scratch")
    num_classes: int = _opt(20, min=1, doc="classes C (background is not one); 20 for VOC")
    detach_stage2: bool = _opt(True, doc="stop gradients after stage 2 (conference version)")
    codebook: str = _opt("learned", choices=("learned", "memory"), doc="VWE/VWL-L or VWL-M")
    num_words: int = _opt(256, min=2, doc="visual words K in the codebook")
    pooling: str = _opt("hspp", choices=("hspp", "gap"),
                        doc="classifier pooling: hybrid spatial pyramid (the paper) or global average (ablation)")
    pool_levels: list[int] = _opt([1, 2, 4], doc="HSPP pyramid levels")
    pool_gamma: float = _opt(2.0, min=0.0, doc="HSPP weight of the global average")
    memory_rho: float = _opt(1e-3, min=0.0, max=1.0, doc="memory-bank EMA rate")
    cls_weight: float = _opt(1.0, min=0.0, doc="classification loss weight")
    hist_weight: float = _opt(1.0, min=0.0,
                              doc="histogram head W_a loss weight; 0: head off and frozen; ignored with memory")
    word_weight: float = _opt(1.0, min=0.0, doc="word head W_b loss weight; 0: head off and frozen")
    decorrelation_weight: float = _opt(0.0, min=0.0, doc="VWL-L codebook decorrelation loss weight")
    grad_checkpointing: bool = _opt(False, doc="recompute backbone stages in the backward pass (less memory)")
    channels_last: bool = _opt(True, doc="NHWC weights and activations (faster on GPUs and bf16 CPUs)")


@dataclass
class TrainConfig:
    epochs: int = _opt(6, min=1, doc="passes over the training split (when max_steps is 0)")
    max_steps: int = _opt(0, min=0, doc="optimizer steps; 0: epochs x steps per epoch")
    batch_size: int = _opt(16, min=1, doc="global batch (all processes, all accumulation steps)")
    grad_accum: int = _opt(1, min=1, doc="micro-batches accumulated per optimizer step")
    lr: float = _opt(0.01, min=0.0, doc="backbone learning rate")
    head_lr_mult: float = _opt(10.0, min=0.0, doc="new layers learn at lr x this")
    momentum: float = _opt(0.9, min=0.0, max=1.0, doc="SGD momentum (the published code ran with ~0: docs/training.md)")
    weight_decay: float = _opt(1e-4, min=0.0, doc="SGD weight decay, every trained parameter")
    poly_power: float = _opt(0.9, min=0.0, doc="lr x (1 - step / max_steps) ** poly_power")
    mixed_precision: str = _opt("auto", choices=("auto", "no", "fp16", "bf16"),
                                doc="auto: bf16 where the device computes it natively, else fp32 (no); "
                                    "fp16 needs a GPU")
    compile: bool = _opt(False, doc="torch.compile the model")
    seed: int = _opt(0, min=0, doc="seed of the model initialisation and of every sample's augmentation")
    deterministic: bool = _opt(False, doc="deterministic algorithms (bit-exact resume)")
    cudnn_benchmark: bool = _opt(True, doc="GPU: cuDNN times its convolution algorithms for each input shape and "
                                           "keeps the fastest (training crops have one shape); off under "
                                           "train.deterministic")
    log_every: int = _opt(10, min=1, doc="steps between metrics records and progress lines")
    checkpoint_every: int = _opt(200, min=0, doc="steps between checkpoints; 0 = only at the end")
    keep_checkpoints: int = _opt(3, min=1, doc="newest checkpoints kept")
    resume: str = _opt("auto", doc="auto (newest verified checkpoint) | none | path to a checkpoint folder")
    resume_changed: str = _opt("error", choices=("error", "allow"),
                               doc="resume with settings that change the result: refuse, or allow and record")


@dataclass
class InferConfig:
    scales: list[float] = _opt([1.0, 0.5, 1.5, 2.0], doc="image scales whose CAMs are summed (docs/method.md)")
    flip: bool = _opt(True, doc="also the horizontal flip at each scale (elementwise max with the image's CAM)")
    weights: str = _opt("", doc="weights file (.safetensors) or a training checkpoint folder (its model weights); "
                                "empty: the run's exported final weights")
    out_dir: str = _opt("", doc="CAM folder; empty: <run_dir>/cams")
    dtype: str = _opt("float16", choices=("float16", "float32"), doc="stored CAM precision")
    mixed_precision: str = _opt("no", choices=("auto", "no", "fp16", "bf16"),
                                doc="inference autocast; no (fp32) in the paper configs, auto: bf16 where native "
                                    "(docs/inference.md: what it changes)")
    batch_size: int = _opt(4, min=1, doc="images of equal size per forward (each with its flip)")
    group_window: int = _opt(0, min=0, doc="images that may wait for others of their size to fill a batch (memory: "
                                           "that many images, at every scale unless resized on the device); "
                                           "0: infer.batch_size")
    resize_on: str = _opt("auto", choices=("auto", "loader", "device"),
                          doc="where the scales are made: the loader's workers, or the device from the decoded "
                              "image (the same pixels, bit for bit); auto: the device on a GPU, else the loader")
    cudnn: bool = _opt(True, doc="GPU: cuDNN's convolutions; false: PyTorch's own (im2col and cuBLAS), which plan "
                                 "nothing per image size (docs/inference.md)")
    num_workers: int = _opt(2, min=0, doc="loader workers per rank for inference")
    legacy_dir: str = _opt("", doc="also export pickled-dict .npy CAMs (IRNet format) into this folder")


@dataclass
class EvalConfig:
    bkg: float = _opt(0.14, min=0.0, max=1.0, doc="background score")
    sweep: list[float] = _opt([0.05, 0.60, 0.01], doc="start, stop (inclusive), step for --sweep")
    allow_missing: bool = _opt(False, doc="evaluate even if some ids have no CAM")
    max_listed: int = _opt(20, min=1, doc="ids listed in a completeness error")
    num_workers: int = _opt(0, min=0, doc="threads per rank reading masks and CAMs and counting; 0: the cores "
                                          "this process may use, shared among the node's ranks")
    cams: str = _opt("", doc="score the CAMs in this folder as they are, not matched to the weights infer would "
                             "use (recorded in the report); empty: the run's CAMs, which must come from those weights")


@dataclass
class RefineConfig:
    method: str = _opt("crf", choices=("crf", "threshold"),
                       doc="DenseCRF on the CAMs (extension's script), or the plain background-score argmax")
    cam_dir: str = _opt("", doc="CAM folder to refine; empty: the run's (infer.out_dir or <run_dir>/cams)")
    out_dir: str = _opt("", doc="label PNG folder; empty: <run_dir>/pseudo_labels")
    bkg: float = _opt(0.15, min=0.0, max=1.0, doc="background score (0.15 in the published CRF script)")
    gaussian_sxy: float = _opt(1.0, min=0.0, doc="CRF Gaussian (smoothness) kernel: spatial std in pixels")
    gaussian_compat: float = _opt(3.0, min=0.0, doc="CRF Gaussian kernel weight (Potts compatibility)")
    bilateral_sxy: float = _opt(64.0, min=0.0, doc="CRF bilateral (appearance) kernel: spatial std in pixels")
    bilateral_srgb: float = _opt(3.0, min=0.0, doc="CRF bilateral kernel: colour std in RGB levels")
    bilateral_compat: float = _opt(4.0, min=0.0, doc="CRF bilateral kernel weight (Potts compatibility)")
    iterations: int = _opt(10, min=1, doc="CRF mean-field iterations")
    color: bool = _opt(True, doc="also write VOC-palette colour PNGs into <out_dir>/color")


@dataclass
class SegConfig:
    """The segmentation stage (docs/segmentation.md): DeepLabV2 trained on a label split, scored on val.
    Defaults are deeplab-pytorch's configs/voc12.yaml recipe."""
    train_split: str = _opt("train_aug_pseudo", doc="label split DeepLab trains on (made by `vwe prepare "
                                                    "--labels-from`; the pipeline makes it from the pseudo labels)")
    data_root: str = _opt("", doc="where train_split is (a data root); empty: <seg dir>/shards, where the pipeline "
                                  "writes it")
    eval_split: str = _opt("val", doc="split of data.root the trained network is scored on (test: predictions only)")
    backbone: str = _opt("resnet101", choices=("resnet18", "resnet34", "resnet50", "resnet101"),
                         doc="torchvision ResNet at output stride 8 (the recipe: resnet101; 18/34 for CPU runs)")
    pretrained: str = _opt("imagenet", doc="imagenet | none | path to an ImageNet ResNet state dict "
                                           "(segmentation weights are refused: they saw VOC masks)")
    norm: str = _opt("frozen_all", choices=("frozen_all", "frozen", "batch", "syncbatch", "group"),
                     doc="frozen_all: BatchNorm fixed as in the recipe; batch/syncbatch/group to train from scratch")
    num_classes: int = _opt(21, min=2, doc="classes including background")
    aspp_rates: list[int] = _opt([6, 12, 18, 24], doc="ASPP dilations (four 3x3 branches, summed)")
    msc_scales: list[float] = _opt([0.5, 0.75], doc="extra training input scales beside 1.0; each output and "
                                                    "their max get a loss; [] for single scale")
    crop_size: int = _opt(321, min=16, doc="training crop (padding: image mean, label 255)")
    scales: list[float] = _opt([0.5, 0.75, 1.0, 1.25, 1.5], doc="random rescale choices before the crop")
    flip: bool = _opt(True, doc="random horizontal flip in training")
    batch_size: int = _opt(10, min=1, doc="global batch per optimizer step (all processes and accumulation steps)")
    grad_accum: int = _opt(2, min=1, doc="micro-batches accumulated per optimizer step")
    fuse_micro_batches: bool = _opt(False, doc="run a step's grad_accum micro-batches as one forward and backward, "
                                               "each one's loss averaged on its own as when accumulated: the same "
                                               "samples and gradients to float tolerance, larger batches on the "
                                               "device; needs a per-sample norm (frozen_all, frozen, group)")
    compile: bool = _opt(False, doc="torch.compile DeepLab for training: fused elementwise work, fewer kernel "
                                    "launches, minutes of compiling at the start (docs/segmentation.md)")
    max_steps: int = _opt(20000, min=1, doc="optimizer steps (iterations)")
    lr: float = _opt(2.5e-4, min=0.0, doc="backbone learning rate")
    head_lr_mult: float = _opt(10.0, min=0.0, doc="ASPP weights learn at lr x this")
    head_bias_lr_mult: float = _opt(20.0, min=0.0, doc="ASPP biases learn at lr x this (no weight decay)")
    momentum: float = _opt(0.9, min=0.0, max=1.0, doc="SGD momentum")
    weight_decay: float = _opt(5e-4, min=0.0, doc="SGD weight decay (not on the ASPP biases)")
    poly_power: float = _opt(0.9, min=0.0, doc="lr x (1 - s / max_steps) ** poly_power")
    lr_every: int = _opt(10, min=1, doc="steps between lr updates (s rounded down to a multiple; the recipe's 10)")
    mixed_precision: str = _opt("auto", choices=("auto", "no", "fp16", "bf16"), doc="training precision")
    checkpoint_every: int = _opt(1000, min=0, doc="steps between checkpoints; 0 = only at the end")
    test_scales: list[float] = _opt([1.0, 0.5, 0.75], doc="prediction scales, fused by pixel-wise max")
    test_flip: bool = _opt(False, doc="also the flipped image at each scale (not in the recipe)")
    crf: bool = _opt(True, doc="DenseCRF on the predictions (the recipe's post-processing)")
    crf_iterations: int = _opt(10, min=1, doc="CRF mean-field iterations")
    crf_pos_w: float = _opt(3.0, min=0.0, doc="CRF Gaussian kernel weight")
    crf_pos_xy_std: float = _opt(1.0, min=0.0, doc="CRF Gaussian kernel spatial std (pixels)")
    crf_bi_w: float = _opt(4.0, min=0.0, doc="CRF bilateral kernel weight")
    crf_bi_xy_std: float = _opt(67.0, min=0.0, doc="CRF bilateral kernel spatial std (pixels)")
    crf_bi_rgb_std: float = _opt(3.0, min=0.0, doc="CRF bilateral kernel colour std")
    crf_image: str = _opt("rgb", choices=("rgb", "recipe"), doc="CRF colour input: the photo, or the recipe's "
                                                               "wrapped mean-subtracted BGR (to match its numbers)")
    infer_precision: str = _opt("no", choices=("auto", "no", "fp16", "bf16"), doc="prediction autocast")
    eval_batch_size: int = _opt(1, min=1, doc="images of equal size per prediction forward")
    weights: str = _opt("", doc="DeepLab weights to score (file or checkpoint folder); empty: the stage's final")
    out_dir: str = _opt("", doc="the stage's folder (checkpoints, weights, predictions, reports); empty: <run_dir>/seg")
    labels: str = _opt("crf", choices=("crf", "irn"), doc="pseudo labels `vwe segment` makes its split from (when "
                                                         "seg.data_root is empty): "
                                                         "refine's CRF labels, or the IRNet random walk's")


@dataclass
class IrnConfig:
    """The IRNet stage (docs/irnet.md): CAMs -> relation labels -> relation network -> random walk labels.
    Defaults are IRNet's run_sample.py and train_irn.py."""
    cam_dir: str = _opt("", doc="CAMs to start from; empty: the run's (infer.out_dir or <run_dir>/cams)")
    label_split: str = _opt("train_aug", doc="split whose CAMs become relation labels and random-walk labels")
    conf_fg_thres: float = _opt(0.30, min=0.0, max=1.0, doc="background score for confident foreground")
    conf_bg_thres: float = _opt(0.05, min=0.0, max=1.0, doc="background score for confident background")
    backbone: str = _opt("resnet50", choices=("resnet18", "resnet34", "resnet50", "resnet101"),
                         doc="the frozen backbone (IRNet: ResNet-50, strides 2, 2, 2, 1)")
    pretrained: str = _opt("imagenet", doc="backbone weights: imagenet | none | path to a state dict")
    crop_size: int = _opt(512, min=32, doc="training crop (a multiple of 4); also the inference padding")
    scale_range: list[float] = _opt([0.5, 1.5], doc="random rescale range [lo, hi] in training")
    radius: int = _opt(10, min=1, doc="path-index radius of the affinity loss (at stride 4)")
    batch_size: int = _opt(32, min=1, doc="global batch")
    grad_accum: int = _opt(1, min=1, doc="micro-batches accumulated per optimizer step")
    epochs: int = _opt(3, min=1, doc="training epochs (when max_steps is 0)")
    max_steps: int = _opt(0, min=0, doc="optimizer steps; 0: epochs x steps per epoch")
    lr: float = _opt(0.1, min=0.0, doc="boundary branch lr; the displacement branch learns at 10x")
    weight_decay: float = _opt(1e-4, min=0.0, doc="SGD weight decay")
    momentum: float = _opt(1e-4, min=0.0, max=1.0, doc="SGD momentum: IRNet passed weight_decay as momentum "
                                                       "(docs/irnet.md); 0.9 is what its text suggests")
    poly_power: float = _opt(0.9, min=0.0, doc="lr x (1 - step / max_steps) ** poly_power")
    mixed_precision: str = _opt("auto", choices=("auto", "no", "fp16", "bf16"), doc="training precision")
    checkpoint_every: int = _opt(200, min=0, doc="steps between checkpoints; 0 = only at the end")
    beta: float = _opt(10.0, min=0.0, doc="transition matrix = affinity ** beta")
    exp_times: int = _opt(8, min=0, doc="the random walk takes 2 ** exp_times steps")
    walk_radius: int = _opt(5, min=1, doc="path-index radius of the random walk")
    sem_seg_bg_thres: float = _opt(0.25, min=0.0, max=1.0, doc="background score after the walk")
    weights: str = _opt("", doc="relation network weights (file or checkpoint folder); empty: the stage's final")
    out_dir: str = _opt("", doc="the stage's folder (relation labels, checkpoints, weights, pseudo labels); "
                                "empty: <run_dir>/irn")


@dataclass
class OutputConfig:
    run_dir: str = _opt("runs/default", doc="where checkpoints, weights, CAMs, reports and logs go")
    tensorboard: bool = _opt(True, doc="TensorBoard event files under <run_dir>/tb")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)
    seg: SegConfig = field(default_factory=SegConfig)
    irn: IrnConfig = field(default_factory=IrnConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_SCI = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
MAX_ENV_NESTING = 8  # ${A:-${B:-...}} levels


def expand_env(value: str, where: str) -> str:
    """Expand ${VAR}, ${VAR:-default} (default when unset or empty, as the shell's `:-`) and ${VAR-default}
    (default only when unset) in a string; defaults may hold references themselves. An unset variable
    without a default, and any other `${` (no name, no closing brace, another operator), is a ConfigError."""
    text, _ = _expand(value, 0, 0, where, evaluate=True, nested=False)
    return text


def _expand(text: str, pos: int, depth: int, where: str, evaluate: bool, nested: bool) -> tuple[str, int]:
    """Expand from `pos` to the end (or, when `nested`, to the `}` closing a default); returns the text and
    the position after it. With `evaluate` false the syntax is checked but nothing is looked up (the
    default of a variable that is set is never used, as in the shell)."""
    out: list[str] = []
    while pos < len(text):
        c = text[pos]
        if nested and c == "}":
            return "".join(out), pos + 1
        if c == "$" and text.startswith("{", pos + 1):
            value, pos = _reference(text, pos, depth, where, evaluate)
            out.append(value)
        else:
            out.append(c)
            pos += 1
    if nested:
        raise ConfigError(f"{where}: unterminated '${{' in {text!r} (no closing '}}')")
    return "".join(out), pos


def _reference(text: str, start: int, depth: int, where: str, evaluate: bool) -> tuple[str, int]:
    """The value of the reference `${...}` starting at `start`, and the position after it."""
    m = _NAME.match(text, start + 2)
    if m is None:
        raise ConfigError(f"{where}: '${{' at character {start + 1} of {text!r} must be followed by a variable "
                          f"name: write ${{NAME}}, ${{NAME:-default}} or ${{NAME-default}}")
    name, pos = m.group(), m.end()
    if pos >= len(text):
        raise ConfigError(f"{where}: unterminated '${{{name}' in {text!r} (no closing '}}')")
    is_set = name in os.environ
    if text[pos] == "}":
        if evaluate and not is_set:
            raise ConfigError(f"{where}: environment variable ${{{name}}} is not set")
        return os.environ.get(name, ""), pos + 1
    op = ":-" if text.startswith(":-", pos) else "-" if text[pos] == "-" else None
    if op is None:
        raise ConfigError(f"{where}: unsupported '${{{name}{text[pos:pos + 2]}' in {text!r}: write ${{NAME}}, "
                          f"${{NAME:-default}} or ${{NAME-default}}")
    if depth >= MAX_ENV_NESTING:
        raise ConfigError(f"{where}: environment references nested deeper than {MAX_ENV_NESTING} levels in "
                          f"{text[:80]!r}")
    use_default = not is_set or (op == ":-" and os.environ[name] == "")
    default, pos = _expand(text, pos + len(op), depth + 1, where, evaluate and use_default, nested=True)
    return (default if use_default else os.environ[name]), pos


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str, src: str) -> Any:
    """Check (and mildly coerce: int->float, str env expansion) one value against its annotated type."""
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        (item_tp,) = typing.get_args(tp)[:1]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{src}: '{key}' must be a list of {_type_name(item_tp)}, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]", src) for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        raise TypeError("union fields are not supported")  # schema authoring error, not user error
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{src}: '{key}' must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{src}: '{key}' must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _SCI.match(value.strip()):
            return float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{src}: '{key}' must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            raise ConfigError(f"{src}: '{key}' must be a string, got {value!r}")
        return expand_env(value, f"{src}: '{key}'")
    raise TypeError(f"unsupported schema type {tp!r} for {key}")


def _check_range(value: Any, f: dataclasses.Field, key: str, src: str) -> None:
    meta = f.metadata
    items = value if isinstance(value, list) else [value]
    for i, v in enumerate(items):
        # NaN fails every comparison below, so it would pass any range: refuse it (and +-Inf) first
        if isinstance(v, float) and not math.isfinite(v) and not meta.get("nonfinite"):
            where = f"{key}[{i}]" if isinstance(value, list) else key
            raise ConfigError(f"{src}: '{where}' must be a finite number, got {v!r}")
        if meta.get("choices") and v not in meta["choices"]:
            raise ConfigError(f"{src}: '{key}' must be one of {', '.join(map(str, meta['choices']))}; got {v!r}")
        if meta.get("min") is not None and v < meta["min"]:
            raise ConfigError(f"{src}: '{key}' must be >= {meta['min']}, got {v!r}")
        if meta.get("max") is not None and v > meta["max"]:
            raise ConfigError(f"{src}: '{key}' must be <= {meta['max']}, got {v!r}")


# Keys that were renamed: refused with the new name (a silent alias would let two keys disagree).
RENAMED = {"infer.checkpoint": "infer.weights (it names a weights file or a checkpoint folder)"}


def _unknown(key: str, valid: list[str], src: str) -> ConfigError:
    if key in RENAMED:
        return ConfigError(f"{src}: '{key}' was renamed: use {RENAMED[key]}")
    leaf = key.rsplit(".", 1)[-1]
    prefix = key[: -len(leaf)]
    close = difflib.get_close_matches(leaf, valid, n=1, cutoff=0.5)
    hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f" (valid: {', '.join(valid)})"
    return ConfigError(f"{src}: unknown key '{key}'{hint}")


def _build(cls: type, data: Any, prefix: str, src: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{src}: '{prefix.rstrip('.') or '<top>'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            raise _unknown(f"{prefix}{key}", list(fields), src)
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            continue
        tp = hints[name]
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, data[name], f"{key}.", src)
        else:
            value = data[name]
            choices = f.metadata.get("choices") or ()
            if tp is str and isinstance(value, bool) and ("no" if value is False else "yes") in choices:
                value = "no" if value is False else "yes"  # YAML 1.1 reads a bare no/yes as a boolean
            value = _coerce(value, tp, key, src)
            _check_range(value, f, key, src)
            kwargs[name] = value
    return cls(**kwargs)


# Keys naming files or folders: a component longer than the file system allows is refused here, before
# any command creates a folder or a log file under it.
PATH_KEYS = ("data.root", "model.pretrained", "train.resume", "infer.weights", "infer.out_dir", "infer.legacy_dir",
             "eval.cams", "refine.cam_dir", "refine.out_dir", "seg.pretrained", "seg.weights", "seg.out_dir", "seg.data_root",
             "irn.cam_dir", "irn.weights", "irn.out_dir", "output.run_dir")


def _validate(cfg: Config, src: str) -> None:
    """Cross-field checks that a single field's range cannot express."""
    for key, value in (("data.root", cfg.data.root), ("output.run_dir", cfg.output.run_dir)):
        if not value.strip():
            raise ConfigError(f"{src}: '{key}' is empty (an environment variable set to ''?); it names a folder")
    for key in PATH_KEYS:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value and "://" not in value and not value.startswith("pipe:") and long_component(value):
            raise ConfigError(f"{src}: '{key}': {os_cause(OSError(errno.ENAMETOOLONG, ''), value)}: {value}")
    for key, values in (("seg.scales", cfg.seg.scales), ("seg.test_scales", cfg.seg.test_scales),
                        ("seg.msc_scales", cfg.seg.msc_scales or [1.0]), ("infer.scales", cfg.infer.scales)):
        if not values or not all(v > 0 for v in values):
            raise ConfigError(f"{src}: '{key}' must be a non-empty list of scales > 0, got {values}")
    lo, hi = (cfg.irn.scale_range + [0, 0])[:2]
    if len(cfg.irn.scale_range) != 2 or not 0 < lo <= hi:
        raise ConfigError(f"{src}: 'irn.scale_range' must be [lo, hi] with 0 < lo <= hi, got {cfg.irn.scale_range}")
    lo_hi = cfg.data.long_side
    if len(lo_hi) != 2 or not 0 < lo_hi[0] <= lo_hi[1]:
        raise ConfigError(f"{src}: 'data.long_side' must be [lo, hi] with 0 < lo <= hi, got {lo_hi}")
    if not cfg.model.pool_levels or any(l < 1 for l in cfg.model.pool_levels):
        raise ConfigError(f"{src}: 'model.pool_levels' must be positive integers, got {cfg.model.pool_levels}")
    if not cfg.infer.scales or any(s <= 0 for s in cfg.infer.scales):
        raise ConfigError(f"{src}: 'infer.scales' must be positive numbers, got {cfg.infer.scales}")
    sw = cfg.eval.sweep
    if len(sw) != 3 or sw[2] <= 0 or sw[0] > sw[1]:
        raise ConfigError(f"{src}: 'eval.sweep' must be [start, stop, step] with start <= stop and step > 0, got {sw}")
    if cfg.train.batch_size % cfg.train.grad_accum:
        raise ConfigError(f"{src}: 'train.batch_size' ({cfg.train.batch_size}) must be divisible by "
                          f"'train.grad_accum' ({cfg.train.grad_accum})")


def parse_override(text: str) -> tuple[str, Any]:
    """'model.num_words=64' -> ('model.num_words', 64); the value is parsed as a YAML scalar or list."""
    if "=" not in text:
        raise ConfigError(f"command line: override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"command line: override {text!r} has no key")
    try:
        value = parse_yaml(raw, "command line") if raw.strip() else ""
    except ConfigError as e:
        raise ConfigError(f"command line: cannot parse value of '{key}': {str(e).removeprefix('command line: ')}") \
            from None
    return key, value


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"command line: '{key}' goes below '{p}', which is not a section")
        node = nxt
    node[parts[-1]] = value


MAX_YAML_DEPTH = 32  # sections, keys and lists need 3; the composer recurses per level


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:
                continue  # unhashable key: construct_mapping below reports it
            if first is not None:
                raise ConfigError(f"key {key!r} is given twice in one mapping (lines {first.start_mark.line + 1} "
                                  f"and {key_node.start_mark.line + 1}); keep one")
            seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


def _check_depth(text: str) -> None:
    """Refuse nesting deeper than MAX_YAML_DEPTH before composing (the parser is iterative, the composer
    recursive: a 5000-deep list would end in a RecursionError)."""
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_YAML_DEPTH:
                raise ConfigError(f"nested deeper than {MAX_YAML_DEPTH} levels (line {event.start_mark.line + 1}); "
                                  f"a config is sections of keys")
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


def parse_yaml(text: str, where: str) -> Any:
    """A YAML document read safely: no duplicate keys, bounded nesting; ConfigError prefixed by `where`."""
    try:
        _check_depth(text)
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML: {e}") from None
    except RecursionError:  # not expected past _check_depth; never a traceback
        raise ConfigError(f"{where}: nested too deeply to read") from None


def _read_config_file(p: Path) -> dict:
    """The mapping a config file holds; ConfigError naming the file for everything else."""
    try:
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not a UTF-8 text file (byte {e.start}: {e.reason}); "
                          f"a config is a YAML file") from None
    except OSError as e:
        raise ConfigError(f"{path_problem(p, e)} (config file)") from None
    loaded = parse_yaml(text, str(p))
    if loaded is None:
        raise ConfigError(f"{p}: the file is empty (or only comments): a config sets at least one section; "
                          f"write '{{}}' for all defaults")
    if not isinstance(loaded, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of sections, got {type(loaded).__name__}")
    return loaded


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML config (or the defaults when path is None), apply overrides, validate strictly."""
    tree: dict = {}
    src = "defaults"
    if path is not None:
        src = str(path)
        tree = _read_config_file(Path(path))
    cfg = _build(Config, tree, "", src)
    if overrides:
        over: dict = {}
        for text in overrides:
            key, value = parse_override(text)
            _set_dotted(over, key, value)
        # overrides are validated on their own first, so an error names the command line, not the file
        _build(Config, over, "", "command line")
        merged = _merge(dataclasses.asdict(cfg), over)
        cfg = _build(Config, merged, "", f"{src} + command line")
    _validate(cfg, src if not overrides else f"{src} + command line")
    return cfg


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def config_from_dict(tree: dict, src: str = "dict") -> Config:
    """Build and validate a Config from a plain nested dict (e.g. one stored beside a checkpoint)."""
    cfg = _build(Config, tree, "", src)
    _validate(cfg, src)
    return cfg


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (atomically)."""
    from vwe.runtime.files import atomic_write
    atomic_write(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False), "config")


def repo_configs_dir() -> Path:
    """The shipped configs/ folder (next to the package in a checkout or the container image)."""
    return Path(__file__).resolve().parents[2] / "configs"
