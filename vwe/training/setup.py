"""What a training run is built from: the Accelerator, the model, SGD with the poly schedule, the counters."""
from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import (DistributedDataParallelKwargs, DistributedType, GradientAccumulationPlugin,
                               InitProcessGroupKwargs)

from vwe.formats.config import Config, ModelConfig, TrainConfig
from vwe.nets.backbone import only_frozen_buffers
from vwe.runtime.dist import import_before_group
from vwe.data.loader import micro_batch_size, steps_per_epoch
from vwe.runtime.device import native_bf16, precision_note, resolve_precision
from vwe.training.recipe import CamRecipe, Recipe
from vwe.runtime.errors import ConfigError


@dataclass
class TrainState:
    """Counters saved with every checkpoint; `micro` counts micro-batches done in the current epoch."""
    step: int = 0
    epoch: int = 0
    micro: int = 0
    samples: int = 0
    skipped: int = 0

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, d: dict) -> None:
        for k, v in d.items():
            setattr(self, k, int(v))


@dataclass
class Parts:
    """The built pieces of a run. `model_cfg` is what was built: the run's model section, except where a
    runtime forces another layout (channels_last off under DeepSpeed); the run's config stays as given."""
    cfg: Config
    model_cfg: ModelConfig
    accelerator: Accelerator
    engine: torch.nn.Module     # the network as prepared by Accelerate (DDP wrapper or DeepSpeed engine)
    net: torch.nn.Module        # the unwrapped network
    optimizer: torch.optim.Optimizer
    scheduler: PolySchedule
    input_dtype: torch.dtype
    micro_batch: int
    steps_per_epoch: int
    max_steps: int
    recipe: Recipe

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def deepspeed(self) -> bool:
        return self.accelerator.distributed_type == DistributedType.DEEPSPEED



def poly_factor(step: int, max_steps: int, power: float, every: int = 1) -> float:
    """Polynomial decay `(1 - s / max_steps) ** power` at s = step rounded down to a multiple of `every`
    (deeplab-pytorch updates its lr every 10 iterations: docs/segmentation.md)."""
    return (1 - min(every * (step // every), max_steps) / max_steps) ** power


class PolySchedule:
    """Every group's lr = its base lr x poly_factor(step): stepped once per optimizer step, it gives the
    lr before the update of step + 1. Its state is the step alone: the base lrs, max_steps and the power
    come from the run's config, so a resume with allowed changes (train.lr, train.max_steps) follows the
    new schedule from the checkpoint's step on, and the schedule restores through load_state_dict."""

    def __init__(self, optimizer: torch.optim.Optimizer, max_steps: int, power: float, every: int = 1) -> None:
        self.optimizer, self.max_steps, self.power, self.every = optimizer, max_steps, power, every
        self.base_lrs = [g["lr"] for g in optimizer.param_groups]
        self.load_state_dict({"step": 0})

    def step(self) -> None:
        self.load_state_dict({"step": self.last_step + 1})

    def get_last_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"step": self.last_step}

    def load_state_dict(self, state: dict) -> None:
        self.last_step = int(state["step"])
        factor = poly_factor(self.last_step, self.max_steps, self.power, self.every)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor


def make_accelerator(cfg: Config) -> Accelerator:
    """The Accelerator for cfg.train's precision (`auto` resolved for this device) and accumulation, on
    GPU, CPU or DeepSpeed."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    precision = resolve_precision(cfg.train.mixed_precision, device)
    if precision == "fp16" and not cuda:
        raise ConfigError("train.mixed_precision=fp16 needs a GPU (fp16 loss scaling is not supported on CPU); "
                          "use bf16 or auto on CPU")
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"train: {precision_note(cfg.train.mixed_precision, precision, device)}", file=sys.stderr)
    if precision == "bf16" and not native_bf16(device):
        print("warning: this CPU has no native bf16 (oneDNN reports none): bf16 autocast is emulated and was "
              "measured >10x slower than fp32 on such a CPU (docs/benchmarks.md); train.mixed_precision=no "
              "is faster here", file=sys.stderr)
    # Without a GPU the ranks only form a group if Accelerate is told so: cpu=True for plain data
    # parallelism (launch/cpu.yaml), or the gloo backend named for DeepSpeed, which cpu=True would
    # silently switch off. In a single process no backend may be named (there is no group to join).
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true")
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    handlers = [InitProcessGroupKwargs(backend="gloo")] if launched and deepspeed and not cuda else []
    import_before_group()
    # `vwe pipeline` trains several networks in one process, each at its own precision: Accelerate's
    # process-wide state would refuse a second one, so only its distributed part (the group) is kept
    AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(
        cpu=not cuda and not deepspeed,
        mixed_precision=precision,
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=cfg.train.grad_accum,
                                                                sync_with_dataloader=False),
        kwargs_handlers=handlers,
    )


def deepspeed_batch_fields(ds: dict, micro_batch: int, grad_accum: int, world: int) -> dict:
    """DeepSpeed's batch fields filled from the vwe config where they say "auto" (or are absent); a value
    that disagrees with train.batch_size / processes / train.grad_accum is a ConfigError."""
    ours = {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": grad_accum,
            "train_batch_size": micro_batch * grad_accum * world}
    out = {}
    for key, value in ours.items():
        given = ds.get(key, "auto")
        if given != "auto" and int(given) != value:
            raise ConfigError(f"DeepSpeed config sets {key}={given} but the vwe config implies {value} "
                              f"(train.batch_size / {world} processes / train.grad_accum); set it to \"auto\"")
        out[key] = value
    return out


def configure_deepspeed(accelerator: Accelerator, micro_batch: int, cfg: Config) -> None:
    """Fill DeepSpeed's batch fields from our config: we pass no DataLoader for Accelerate to infer them."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    ds.update(deepspeed_batch_fields(ds, micro_batch, cfg.train.grad_accum, accelerator.num_processes))


def built_model_config(cfg: Config, accelerator: Accelerator) -> ModelConfig:
    """The model section to build: DeepSpeed broadcasts parameters as byte views, which channels_last
    weights do not allow, so it builds contiguous weights (a derived config; cfg is left as given)."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED and cfg.model.channels_last:
        accelerator.print("note: model.channels_last is not used under DeepSpeed")
        return dataclasses.replace(cfg.model, channels_last=False)
    return cfg.model


def choose_algorithms(train: TrainConfig) -> Callable[[], None]:
    """How the training steps pick their kernels, set process-wide; returns what restores the previous
    choice (the per-image passes that follow training in `vwe pipeline` run in the same process, on hundreds
    of image sizes, each of which cuDNN's search would time anew).

    `train.cudnn_benchmark`: cuDNN times its algorithms once per input shape and keeps the fastest.
    `train.deterministic`: no search, PyTorch's deterministic kernels and cuBLAS's fixed workspace (which
    CUDA needs for them); an op with no deterministic CUDA kernel (bilinear upsampling's backward, in
    DeepLab's multi-scale inputs) still runs, with PyTorch's warning naming it, rather than stopping the run."""
    before = (torch.backends.cudnn.benchmark, torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled())
    if train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = train.cudnn_benchmark and not train.deterministic
    torch.use_deterministic_algorithms(train.deterministic, warn_only=True)

    def restore() -> None:
        torch.backends.cudnn.benchmark = before[0]
        torch.use_deterministic_algorithms(before[1], warn_only=before[2])
    return restore


def build_parts(cfg: Config, accelerator: Accelerator, recipe: Recipe | None = None,
                steps_epoch: int | None = None) -> Parts:
    """The recipe's network (the CAM network by default), SGD over its parameter groups and the poly
    schedule at step 0, prepared by Accelerate. `steps_epoch` defaults to the training split's (from its index)."""
    recipe = recipe or CamRecipe()
    world = accelerator.num_processes
    recipe.check(cfg, world)
    micro_batch = micro_batch_size(cfg.train, world)
    model_cfg = built_model_config(cfg, accelerator)
    model = recipe.build(cfg, model_cfg)
    if cfg.train.compile:
        # in place (Module.compile): no `_orig_mod.` wrapper, so checkpoints and the exported weights keep the
        # eager module's names, and a run may resume with compiling switched on or off
        model.compile()
    groups = recipe.param_groups(model, cfg)
    optimizer = torch.optim.SGD(groups, lr=cfg.train.lr, momentum=cfg.train.momentum,
                                weight_decay=cfg.train.weight_decay)
    configure_deepspeed(accelerator, micro_batch, cfg)
    # DDP broadcasts rank 0's buffers before every forward. Frozen BatchNorm's never change after DDP's
    # first synchronisation, so there it would only rewrite them (and make each frozen layer recompute its
    # kept affine map every forward); a memory bank or a trainable BatchNorm keeps the broadcast.
    accelerator.ddp_handler = DistributedDataParallelKwargs(broadcast_buffers=not only_frozen_buffers(model))
    model, optimizer = accelerator.prepare(model, optimizer)
    net = accelerator.unwrap_model(model)
    steps_epoch = steps_epoch or steps_per_epoch(cfg.data, cfg.train)
    max_steps = cfg.train.max_steps or cfg.train.epochs * steps_epoch
    # Not prepared by Accelerate (which would step it once per process): stepped once per optimizer
    # step, it gives lr = base * poly(step) before the update of step+1, the numbers of the derived rule.
    scheduler = PolySchedule(optimizer, max_steps, cfg.train.poly_power, recipe.schedule_every)
    # DeepSpeed runs bf16/fp16 by casting the weights (no autocast): inputs must match them
    input_dtype = next(net.parameters()).dtype if accelerator.distributed_type == DistributedType.DEEPSPEED \
        else torch.float32
    return Parts(cfg=cfg, model_cfg=model_cfg, accelerator=accelerator, engine=model, net=net,
                 optimizer=optimizer, scheduler=scheduler, input_dtype=input_dtype, micro_batch=micro_batch,
                 steps_per_epoch=steps_epoch, max_steps=max_steps, recipe=recipe)
