"""The IRNet stage (docs/irnet.md, "Running it"), parts 1 and 2: relation labels from CAMs and the relation
network trained on them. The random walk that turns both into pseudo labels is vwe/stages/randomwalk.py.

- `vwe irn-labels`: per image of `irn.label_split`, IRNet's cam_to_ir_label (confident foreground and
  background from the CAMs through a DenseCRF, the rest 255) on the per-image pass -> `<irn dir>/ir_labels/`
  (index PNGs carrying the CAM's SHA-256 and the settings), then the label split `ir_labels` in
  `<irn dir>/shards` that the trainer streams.
- `vwe irn-train`: IRNet's relation network (frozen backbone, boundary and displacement branches) on the
  Trainer, from a config derived like the segmentation stage's: its train/data sections carry the `irn`
  recipe and its run_dir is the stage's folder, so checkpoints, exact resume, drift refusal, preemption,
  the lock and TensorBoard work as for the CAM network.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vwe.data.loader import infer_samples, train_batches
from vwe.formats.cams import cam_dir_for
from vwe.formats.config import Config, IrnConfig, ModelConfig
from vwe.formats.labels import encode_label_png
from vwe.labels import confident
from vwe.labels.pathindex import PathIndex, path_index
from vwe.nets.irn import IRNet, NUM_LABELS, STRIDE, irn_loss, pair_losses
from vwe.runtime.dist import collective_call
from vwe.runtime.errors import ConfigError, DataError, VweError
from vwe.runtime.files import atomic_write
from vwe.runtime.skips import SkipPolicy
from vwe.stages.camlabels import CamLabelWork
from vwe.stages.perimage import Output, run_per_image
from vwe.training.recipe import Recipe
from vwe.training.trainer import train

IR_SPLIT = "ir_labels"  # the label split of the relation labels, in <irn dir>/shards
DP_LR_MULT = 10.0       # train_irn.py: the displacement branch learns at 10x the boundary branch's lr
IGNORE = confident.IGNORE

# `irn` keys that do not change what the relation network computes: where files are, the walk's settings,
# and what made the relation labels (a change there changes the label shards, which the data digest refuses)
NEUTRAL_KEYS = frozenset({"irn.cam_dir", "irn.label_split", "irn.conf_fg_thres", "irn.conf_bg_thres", "irn.beta",
                          "irn.exp_times", "irn.walk_radius", "irn.sem_seg_bg_thres", "irn.weights", "irn.out_dir",
                          "irn.checkpoint_every"})
UNUSED_DATA_KEYS = frozenset({"data.long_side", "data.resize", "data.infer_split"})


def irn_dir(cfg: Config) -> Path:
    """The stage's folder: `irn.out_dir`, or `<run_dir>/irn`."""
    return Path(cfg.irn.out_dir) if cfg.irn.out_dir else Path(cfg.output.run_dir) / "irn"


def irn_cam_dir(cfg: Config) -> Path:
    """The CAMs the stage starts from: `irn.cam_dir`, or the run's CAM folder."""
    return Path(cfg.irn.cam_dir) if cfg.irn.cam_dir else cam_dir_for(cfg)


def ir_label_dir(cfg: Config) -> Path:
    return irn_dir(cfg) / "ir_labels"


def label_settings(ic: IrnConfig) -> dict:
    """What a relation label map depends on besides its CAM (IRNet's CRF constants included)."""
    return {"conf_fg_thres": ic.conf_fg_thres, "conf_bg_thres": ic.conf_bg_thres,
            "crf_iterations": confident.CRF_ITERATIONS, "crf_gt_prob": confident.CRF_GT_PROB,
            "crf_gaussian": confident.CRF_GAUSSIAN, "crf_bilateral": confident.CRF_BILATERAL}


def check_cam_dir(cam_dir: Path) -> None:
    if not cam_dir.is_dir():
        raise DataError(f"CAM folder {cam_dir} does not exist: run `vwe infer` on irn.label_split first "
                        f"(data.infer_split=<that split>), or set irn.cam_dir")


# ------------------------------------------------------------------------------------- relation labels

class IrLabelWork(CamLabelWork):
    """One image's relation labels (the per-image part of `vwe irn-labels`); tallies how much of the image
    is confident and, where the split has masks, how often the confident pixels are right."""
    name, what = "irn-labels", "relation label"

    def __init__(self, cfg: Config, cam_dir: Path, out_dir: Path) -> None:
        super().__init__()
        from vwe.stages.refine import check_crf_available
        check_crf_available()
        self.cfg, self.ic, self.cam_dir, self.out_dir = cfg, cfg.irn, cam_dir, out_dir
        self.split, self.data_root = cfg.irn.label_split, cfg.data.root
        self.fingerprint = label_settings(cfg.irn)
        self.pixels = np.zeros(3, np.int64)     # background, foreground, unsure
        self.checked = np.zeros(2, np.int64)    # confident pixels with a known mask value: right, all

    def samples(self, rank: int, world: int, skips: SkipPolicy) -> Iterator[dict]:
        return infer_samples(self.cfg.data, self.cfg.infer, rank, world, split=self.split, with_scales=False,
                             with_image=True, skips=skips)


    def compute(self, samples: list[dict]) -> list[Output]:
        outputs = []
        for sample in samples:
            rec = sample["cam"]
            label = confident.cam_to_ir_label(np.ascontiguousarray(sample["image"].permute(1, 2, 0).numpy()),
                                              rec.high_res, rec.keys, self.ic.conf_fg_thres, self.ic.conf_bg_thres)
            outputs.append(Output(sample["key"], encode_label_png(label, sample["source"], palette=False), label))
        return outputs

    def account(self, sample: dict, label: np.ndarray) -> None:
        self.pixels += [(label == 0).sum(), ((label > 0) & (label != IGNORE)).sum(), (label == IGNORE).sum()]
        if sample["mask"] is not None:
            gt = sample["mask"].numpy()
            known = (label != IGNORE) & (gt != IGNORE)
            self.checked += [(label[known] == gt[known]).sum(), known.sum()]

    def rank_totals(self) -> dict:
        return {"pixels": self.pixels, "checked": self.checked, **super().rank_totals()}

    def manifest(self) -> dict:
        return {"cam_dir": str(self.cam_dir), "weights_sha256": self.cam_weights_sha256, "settings": self.fingerprint}

    def report(self, ranks: list[dict], totals: dict, seconds: float, world: int) -> None:
        pixels = sum(p["pixels"] for p in ranks)
        right, known = (int(v) for v in sum(p["checked"] for p in ranks))
        fractions = dict(zip(("background", "foreground", "unsure"), (pixels / max(int(pixels.sum()), 1)).tolist()))
        images = totals["written"] + totals["already_done"]
        report = {"split": self.split, "settings": self.fingerprint, "cam_dir": str(self.cam_dir),
                  "out_dir": str(self.out_dir), "weights_sha256": self.cam_weights_sha256, "num_images": images,
                  **{k: totals[k] for k in ("written", "already_done", "stale_replaced")},
                  "skipped": totals["skips"], "pixel_fractions": fractions,
                  "confident_accuracy": right / known if known else None, "confident_checked_pixels": known,
                  "processes": world, "seconds": round(seconds, 3)}
        text = (f"Relation labels (conf_fg_thres={self.ic.conf_fg_thres}, conf_bg_thres={self.ic.conf_bg_thres}) "
                f"for '{self.split}': {images} images -> {self.out_dir}\n"
                f"pixels: {100 * fractions['background']:.1f}% background, {100 * fractions['foreground']:.1f}% "
                f"foreground, {100 * fractions['unsure']:.1f}% unsure (ignored by the affinity loss)\n")
        if known:
            text += (f"confident pixels that agree with the masks: {100 * right / known:.1f}% "
                     f"({known} pixels with a known mask value)\n")
        atomic_write(self.out_dir / "report.json", json.dumps(report, indent=2), "irn-labels report")
        atomic_write(self.out_dir / "report.md", text, "irn-labels report")
        print(text + f"report: {self.out_dir / 'report.json'}")


def irn_labels(cfg: Config) -> int:
    """Relation label PNGs for every image of irn.label_split over all ranks, then (rank 0) the label split
    the relation network trains on. 0, or PREEMPT_EXIT_CODE after SIGUSR1/SIGTERM."""
    from vwe.data.targets import prepare_targets
    cam_dir, out_dir = irn_cam_dir(cfg), ir_label_dir(cfg)
    check_cam_dir(cam_dir)
    code = run_per_image(IrLabelWork(cfg, cam_dir, out_dir), cfg.output.run_dir, cfg.data.on_corrupt,
                         cfg.eval.max_listed)
    if code:
        return code
    collective_call(lambda: prepare_targets(irn_dir(cfg) / "shards", cfg.irn.label_split, IR_SPLIT, out_dir,
                                            source_root=cfg.data.root), main_only=True)
    return 0


# ------------------------------------------------------------------------------------ relation network

def build_irn(backbone: str, pretrained: str) -> IRNet:
    """IRNet's relation network with its backbone's weights per `irn.pretrained` (none | imagenet | path)."""
    from vwe.nets.backbone import fetch_imagenet_weights, load_backbone_weights, read_state_dict
    net = IRNet(backbone)
    if pretrained != "none":
        path = fetch_imagenet_weights(backbone) if pretrained == "imagenet" else Path(pretrained).expanduser()
        load_backbone_weights(net.backbone, read_state_dict(path), str(path))
    return net


def affinity_label_tensors(label: torch.Tensor, index: PathIndex) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """vwe.nets.irn.affinity_labels for a batch on its device: (B, h, w) relation labels at the feature size
    -> three (B, D, S) float32 masks (background pairs, same-object pairs, pairs of two known labels)."""
    flat = label.reshape(label.shape[0], -1).long()
    src = torch.tensor(index.src_indices, device=label.device)  # copies: the index's arrays are read-only
    dst = torch.tensor(index.dst_indices, device=label.device)
    s = flat.index_select(1, src)[:, None, :]
    d = flat.index_select(1, dst.reshape(-1)).view(flat.shape[0], *dst.shape)
    valid = (s < NUM_LABELS) & (d < NUM_LABELS)
    same = s == d
    pos = same & valid
    return (pos & (s == 0)).float(), (pos & (s > 0)).float(), (~same & valid).float()


def check_irn_crop(ic: IrnConfig) -> None:
    """The crop must give a feature map (crop / 4) on which every source has its pairs within irn.radius."""
    if ic.crop_size % STRIDE:
        raise ConfigError(f"irn.crop_size={ic.crop_size} must be a multiple of {STRIDE} (the boundary map and the "
                          f"labels reduced x1/{STRIDE} must have the same size)")
    side = ic.crop_size // STRIDE
    try:
        path_index(ic.radius, (side, side))
    except ValueError as e:
        raise ConfigError(f"irn.radius={ic.radius} with irn.crop_size={ic.crop_size}: {e}; use a larger crop or a "
                          f"smaller radius") from None


class IrnRecipe(Recipe):
    """IRNet's relation network: the affinity and displacement losses over the path index at irn.radius,
    boundary branch at lr and displacement branch at 10x lr, poly schedule every step."""
    command = "vwe irn-train"
    sections = ("data", "train", "irn")
    neutral = NEUTRAL_KEYS | UNUSED_DATA_KEYS

    def __init__(self, cfg: Config) -> None:
        self.ic = cfg.irn

    def check(self, cfg: Config, world: int) -> None:
        check_irn_crop(self.ic)

    def build(self, cfg: Config, model_cfg: ModelConfig) -> nn.Module:
        net = build_irn(self.ic.backbone, self.ic.pretrained)
        return net.to(memory_format=torch.channels_last) if model_cfg.channels_last else net

    def param_groups(self, model: nn.Module, cfg: Config) -> list[dict]:
        edge, dp = getattr(model, "module", model).param_groups()
        ic = self.ic
        return [{"name": "boundary", "params": edge, "lr": ic.lr, "weight_decay": ic.weight_decay},
                {"name": "displacement", "params": dp, "lr": ic.lr * DP_LR_MULT, "weight_decay": ic.weight_decay}]

    def losses(self, net: nn.Module, out, batch: dict, device: torch.device) -> dict[str, torch.Tensor]:
        edge, dp = (t.float() for t in out)
        target = batch["target"].to(device, non_blocking=True)
        if tuple(target.shape[-2:]) != tuple(edge.shape[-2:]):
            raise VweError(f"relation labels {tuple(target.shape[-2:])} and boundary map {tuple(edge.shape[-2:])} "
                           f"differ in size (irn.crop_size={self.ic.crop_size})")
        index = path_index(self.ic.radius, tuple(edge.shape[-2:]))
        total, terms = irn_loss(*pair_losses(edge, dp, index), *affinity_label_tensors(target, index))
        return {"loss": total, **terms}

    def batches(self, cfg: Config, rank: int, world: int, epoch: int, start_batch: int,
                skips: SkipPolicy) -> Iterator[dict]:
        return train_batches(cfg.data, cfg.train, rank, world, epoch, start_batch, epochs=None, skips=skips,
                             irn=(self.ic.scale_range[0], self.ic.scale_range[1]))


def irn_training_config(cfg: Config) -> Config:
    """The config the relation network trains with: the irn recipe in the train/data sections (on the
    relation-label split in <irn dir>/shards), the stage's folder as run_dir, a constant model section."""
    ic = cfg.irn
    if len(ic.scale_range) != 2 or not 0 < ic.scale_range[0] <= ic.scale_range[1]:
        raise ConfigError(f"irn.scale_range={ic.scale_range} must be [lo, hi] with 0 < lo <= hi")
    train_cfg = dataclasses.replace(
        cfg.train, epochs=ic.epochs, max_steps=ic.max_steps, batch_size=ic.batch_size, grad_accum=ic.grad_accum,
        lr=ic.lr, head_lr_mult=DP_LR_MULT, momentum=ic.momentum, weight_decay=ic.weight_decay,
        poly_power=ic.poly_power, mixed_precision=ic.mixed_precision, compile=False,
        checkpoint_every=ic.checkpoint_every, resume="auto")
    data_cfg = dataclasses.replace(cfg.data, root=str(irn_dir(cfg) / "shards"), train_split=IR_SPLIT,
                                   crop_size=ic.crop_size, flip=True)
    model_cfg = ModelConfig(channels_last=cfg.model.channels_last)
    output = dataclasses.replace(cfg.output, run_dir=str(irn_dir(cfg)))
    return dataclasses.replace(cfg, train=train_cfg, data=data_cfg, model=model_cfg, output=output)


def irn_train(cfg: Config) -> int:
    """Train the relation network on the relation-label split; 0, or PREEMPT_EXIT_CODE after a checkpoint."""
    derived = irn_training_config(cfg)
    if not (Path(derived.data.root) / f"{IR_SPLIT}.json").is_file():
        raise DataError(f"no relation-label split in {derived.data.root}: run `vwe irn-labels` first")
    return train(derived, IrnRecipe(cfg))
