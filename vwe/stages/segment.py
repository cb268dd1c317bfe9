"""`vwe segment`: DeepLabV2 trained on a label split with deeplab-pytorch's recipe (docs/segmentation.md),
on the same Trainer as the CAM network: Accelerate DDP or ZeRO, precision auto, exact resume, preemption
(exit 75), drift and non-finite refusal, run lock, metrics and TensorBoard. Only the recipe differs.

The run lives in the stage's folder (`seg.out_dir`, default `<run_dir>/seg`), trained from a config derived
from the run's: its `train` and `data` sections carry the `seg` section's recipe (the run's config is not
changed), so checkpoints, resume and drift work as for the CAM network.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from vwe.data.loader import train_batches
from vwe.data.targets import prepare_targets
from vwe.formats.config import Config, ModelConfig
from vwe.nets.backbone import PER_SAMPLE_NORMS
from vwe.nets.deeplab import MSC, build_deeplab, seg_loss, seg_param_groups
from vwe.runtime.dist import collective_call, distributed_state
from vwe.runtime.errors import ConfigError
from vwe.runtime.skips import SkipPolicy
from vwe.stages.segment_eval import seg_dir
from vwe.training.recipe import Recipe
from vwe.training.trainer import train

# `seg` keys that do not change what training computes (prediction, CRF and where files go), and
# compiling, neutral on resume as train.compile is
EVAL_KEYS = frozenset({"seg.compile", "seg.eval_split", "seg.test_scales", "seg.test_flip", "seg.crf",
                       "seg.crf_iterations", "seg.crf_pos_w", "seg.crf_pos_xy_std", "seg.crf_bi_w",
                       "seg.crf_bi_xy_std", "seg.crf_bi_rgb_std", "seg.crf_image", "seg.infer_precision",
                       "seg.eval_batch_size", "seg.weights", "seg.out_dir", "seg.data_root", "seg.checkpoint_every",
                       "seg.train_split"})
# the derived data section's keys the segmentation loader does not read
UNUSED_DATA_KEYS = frozenset({"data.long_side", "data.resize", "data.infer_split"})


def seg_data_root(cfg: Config) -> str:
    """Where the label split DeepLab trains on is: `seg.data_root`, or `<seg dir>/shards` (the pipeline's)."""
    return cfg.seg.data_root or str(seg_dir(cfg) / "shards")


def seg_training_config(cfg: Config) -> Config:
    """The config the segmentation run trains with: the seg recipe in the train/data sections, the stage's
    folder as run_dir, and a constant model section (the CAM network's does not apply)."""
    sc = cfg.seg
    if sc.fuse_micro_batches and sc.norm not in PER_SAMPLE_NORMS:  # a step's micro-batches as one batch
        raise ConfigError(f"seg.fuse_micro_batches: seg.norm={sc.norm} normalises over the batch, so one batch of "
                          f"{sc.grad_accum} micro-batches would compute something else; use one of "
                          f"{', '.join(PER_SAMPLE_NORMS)}, or fuse_micro_batches false")
    train_cfg = dataclasses.replace(
        cfg.train, epochs=1, max_steps=sc.max_steps, batch_size=sc.batch_size,
        grad_accum=1 if sc.fuse_micro_batches else sc.grad_accum, lr=sc.lr,
        head_lr_mult=sc.head_lr_mult, momentum=sc.momentum, weight_decay=sc.weight_decay, poly_power=sc.poly_power,
        mixed_precision=sc.mixed_precision, compile=sc.compile, checkpoint_every=sc.checkpoint_every, resume="auto")
    data_cfg = dataclasses.replace(cfg.data, root=seg_data_root(cfg), train_split=sc.train_split,
                                   crop_size=sc.crop_size, flip=sc.flip)
    model_cfg = ModelConfig(channels_last=cfg.model.channels_last)
    output = dataclasses.replace(cfg.output, run_dir=str(seg_dir(cfg)))
    return dataclasses.replace(cfg, train=train_cfg, data=data_cfg, model=model_cfg, output=output)


class SegRecipe(Recipe):
    """DeepLabV2 with multi-scale inputs (MSC) and their summed losses, the recipe's 1x/10x/20x groups and
    its poly schedule updated every `seg.lr_every` steps."""
    command = "vwe segment"
    sections = ("data", "train", "seg")
    neutral = EVAL_KEYS | UNUSED_DATA_KEYS

    def __init__(self, cfg: Config) -> None:
        self.sc = cfg.seg
        self.schedule_every = cfg.seg.lr_every
        # fused: each batch holds a step's micro-batches, each scored on its own (as accumulation would)
        self.chunks = cfg.seg.grad_accum if cfg.seg.fuse_micro_batches else 1

    def check(self, cfg: Config, world: int) -> None:
        if self.chunks > 1 and cfg.train.batch_size % (world * self.chunks):
            raise ConfigError(f"seg.batch_size ({cfg.train.batch_size}) must be divisible by {world} process(es) x "
                              f"seg.grad_accum ({self.chunks}), fused or not")

    def build(self, cfg: Config, model_cfg: ModelConfig) -> nn.Module:
        sc = self.sc
        model = MSC(build_deeplab(sc.num_classes, sc.backbone, sc.pretrained, sc.norm, tuple(sc.aspp_rates)),
                    tuple(sc.msc_scales))
        return model.to(memory_format=torch.channels_last) if model_cfg.channels_last else model

    def param_groups(self, model: nn.Module, cfg: Config) -> list[dict]:
        return seg_param_groups(model, self.sc.lr, self.sc.weight_decay, self.sc.head_lr_mult,
                                self.sc.head_bias_lr_mult)

    def losses(self, net: nn.Module, out, batch: dict, device: torch.device) -> dict[str, torch.Tensor]:
        target = batch["target"].long()
        if self.chunks == 1:
            return {"loss": seg_loss(out, target)}
        # the loader's batch j is micro-batches j*K .. j*K+K-1 of the unfused run, in order
        parts = zip(zip(*(o.chunk(self.chunks) for o in out)), target.chunk(self.chunks))
        return {"loss": sum(seg_loss(list(o), t) for o, t in parts) / self.chunks}

    def batches(self, cfg: Config, rank: int, world: int, epoch: int, start_batch: int,
                skips: SkipPolicy) -> Iterator[dict]:
        return train_batches(cfg.data, cfg.train, rank, world, epoch, start_batch, epochs=None, skips=skips,
                             seg_scales=tuple(self.sc.scales))


def pseudo_labels(cfg: Config) -> tuple[str, Path]:
    """(split, label folder) of the pseudo labels DeepLab trains on: refine's CRF labels of
    data.infer_split (seg.labels=crf), or the random walk's of irn.label_split (seg.labels=irn)."""
    if cfg.seg.labels == "irn":
        from vwe.stages.randomwalk import walk_label_dir
        return cfg.irn.label_split, walk_label_dir(cfg)
    from vwe.stages.refine import label_dir_for
    return cfg.data.infer_split, label_dir_for(cfg)


def write_label_split(cfg: Config) -> None:
    """The label split `seg.train_split` in `<seg dir>/shards` from the pseudo labels (identical shards
    are kept, so a rerun on the same labels changes nothing and resumes)."""
    split, folder = pseudo_labels(cfg)
    prepare_targets(Path(seg_data_root(cfg)), split, cfg.seg.train_split, folder, source_root=cfg.data.root)


def segment(cfg: Config) -> int:
    """Train DeepLab on `seg.train_split`: with `seg.data_root` empty, first written from the pseudo labels
    (seg.labels); with it given, that split as it is. 0, or PREEMPT_EXIT_CODE after a checkpoint."""
    if not cfg.seg.data_root:
        distributed_state()
        collective_call(lambda: write_label_split(cfg), main_only=True)
    return train(seg_training_config(cfg), SegRecipe(cfg))
