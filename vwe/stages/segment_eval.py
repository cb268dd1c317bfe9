"""Scoring the segmentation network the way papers report it (docs/segmentation.md): multi-scale (+ flip)
prediction, optionally a DenseCRF with deeplab-pytorch's settings, over every image of `seg.eval_split`
on every rank, mIoU against the masks with the CAM evaluation's confusion code and report format.

Predictions are VOC-palette PNGs in the PASCAL test server's layout,
`<seg dir>/results/VOC2012/Segmentation/comp6_<split>_cls/<id>.png` (`comp6_test_cls` for the test split,
which has no masks: predictions only); manifests and the report go to `<seg dir>/eval/<split>/`.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from vwe.data.voc import NUM_LABELS
from vwe.data.loader import infer_samples
from vwe.data.transforms import normalize
from vwe.formats.checkpoint import FINAL_WEIGHTS_NAME, load_weights, stage_weights
from vwe.formats.config import Config, SegConfig
from vwe.formats.labels import encode_label_png, read_label_png
from vwe.nets.deeplab import MSC, build_deeplab, crf_labels, predict_probs, recipe_crf_image
from vwe.report.miou import confusion_matrix, format_table, iou_per_class, scores
from vwe.runtime.device import autocast as device_autocast, precision_note, resolve_precision
from vwe.runtime.dist import distributed_state
from vwe.runtime.errors import CheckpointError
from vwe.runtime.files import atomic_write, file_sha256
from vwe.runtime.skips import SkipPolicy
from vwe.stages.perimage import ImageWork, Output, run_per_image

SHAPE_KEYS = ("backbone", "num_classes", "aspp_rates", "norm")  # what a weights file must agree on


def seg_dir(cfg: Config) -> Path:
    """The segmentation stage's folder: `seg.out_dir`, or `<run_dir>/seg`."""
    return Path(cfg.seg.out_dir) if cfg.seg.out_dir else Path(cfg.output.run_dir) / "seg"


def seg_weights_path(cfg: Config) -> Path:
    """The DeepLab weights `vwe segment-eval` uses: `seg.weights`, else the stage's exported final weights."""
    return stage_weights(cfg.seg.weights, seg_dir(cfg) / FINAL_WEIGHTS_NAME, "seg.weights", "vwe segment")


def prediction_dir(cfg: Config, split: str) -> Path:
    return seg_dir(cfg) / "results" / "VOC2012" / "Segmentation" / f"comp6_{split}_cls"


def crf_settings(sc: SegConfig) -> dict:
    return {"iterations": sc.crf_iterations, "pos_w": sc.crf_pos_w, "pos_xy_std": sc.crf_pos_xy_std,
            "bi_w": sc.crf_bi_w, "bi_xy_std": sc.crf_bi_xy_std, "bi_rgb_std": sc.crf_bi_rgb_std}


def settings(sc: SegConfig) -> dict:
    """What a prediction depends on besides the weights."""
    out = {"test_scales": list(sc.test_scales), "test_flip": sc.test_flip, "crf": sc.crf}
    if sc.crf:
        out.update(crf_settings(sc), crf_image=sc.crf_image)
    return out


def load_seg_model(cfg: Config, device: torch.device) -> tuple[torch.nn.Module, str, Path]:
    """DeepLabV2 from the weights file (its stored seg section decides the shape), in eval mode."""
    path = seg_weights_path(cfg)
    state, saved = load_weights(path)
    sc = cfg.seg
    stored = saved.get("seg", {}) if saved else {}
    differ = [f"seg.{k}: weights {stored[k]!r}, config {getattr(sc, k)!r}" for k in SHAPE_KEYS
              if k in stored and stored[k] != getattr(sc, k)]
    if differ:
        raise CheckpointError(f"segmentation weights {path} were trained with another network: {'; '.join(differ)}")
    bad = [k for k, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise CheckpointError(f"segmentation weights {path}: {len(bad)} tensor(s) hold NaN or Inf "
                              f"(e.g. {', '.join(bad[:3])}); the training that wrote them diverged")
    model = MSC(build_deeplab(sc.num_classes, sc.backbone, "none", sc.norm, tuple(sc.aspp_rates)), ())
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"segmentation weights {path} do not fit DeepLabV2 ({sc.backbone}): {e}") from None
    return model.base.eval().to(device), file_sha256(path), path


class SegPredictWork(ImageWork):
    """One image's segmentation prediction (the per-image part of `vwe segment-eval`), scored on its mask."""
    name, what, suffix = "segment-eval", "prediction", ".png"

    def __init__(self, cfg: Config, net: torch.nn.Module, weights_sha256: str, weights: Path, precision: str,
                 device: torch.device) -> None:
        self.cfg, self.sc, self.net, self.device = cfg, cfg.seg, net, device
        self.split, self.data_root = cfg.seg.eval_split, cfg.data.root
        self.out_dir = prediction_dir(cfg, self.split)
        self.manifest_dir = seg_dir(cfg) / "eval" / self.split
        self.batch_size = cfg.seg.eval_batch_size
        self.weights, self.weights_sha256, self.precision = weights, weights_sha256, precision
        self.source = json.dumps({"weights_sha256": weights_sha256, **settings(cfg.seg)}, sort_keys=True)
        self.conf = np.zeros((NUM_LABELS, NUM_LABELS), np.int64)
        self.no_mask = 0
        if cfg.seg.crf:
            from vwe.stages.refine import check_crf_available
            check_crf_available()

    def samples(self, rank: int, world: int, skips: SkipPolicy) -> Iterator[dict]:
        cfg = dataclasses.replace(self.cfg, data=dataclasses.replace(self.cfg.data, infer_split=self.split))
        return infer_samples(cfg.data, cfg.infer, rank, world, with_scales=False, with_image=True, skips=skips)

    def batch_key(self, sample: dict) -> tuple[int, int]:
        return tuple(sample["size"])

    def current(self, sample: dict, path: Path) -> tuple[bool, np.ndarray | None]:
        found = read_label_png(path)
        if found is not None and found[1] == self.source:
            return True, found[0]
        return False, None

    @torch.no_grad()
    def compute(self, group: list[dict]) -> list[Output]:
        images = torch.stack([s["image"] for s in group])
        x = normalize(images.to(self.device))
        with device_autocast(self.precision, self.device):
            probs = predict_probs(self.net, x, tuple(self.sc.test_scales), self.sc.test_flip).float()
        if not torch.isfinite(probs).all():
            raise CheckpointError(f"segmentation weights {self.weights} give non-finite scores for image(s) "
                                  f"{', '.join(s['key'] for s in group)}; nothing written for them")
        outputs = []
        for sample, p in zip(group, probs.cpu().numpy()):
            if self.sc.crf:
                image = sample["image"].permute(1, 2, 0).numpy()
                if self.sc.crf_image == "recipe":
                    image = recipe_crf_image(image)
                label = crf_labels(np.ascontiguousarray(image), p, **crf_settings(self.sc)).astype(np.uint8)
            else:
                label = p.argmax(axis=0).astype(np.uint8)
            outputs.append(Output(sample["key"], encode_label_png(label, self.source, palette=True), label))
        return outputs

    def account(self, sample: dict, label: np.ndarray) -> None:
        if sample["mask"] is None:
            self.no_mask += 1
            return
        self.conf += confusion_matrix(label, sample["mask"].numpy(), NUM_LABELS)

    def rank_totals(self) -> dict:
        return {"conf": self.conf, "no_mask": self.no_mask}

    def manifest(self) -> dict:
        return {"weights": str(self.weights), "weights_sha256": self.weights_sha256, "settings": settings(self.sc),
                "mixed_precision": self.precision}

    def report(self, ranks: list[dict], totals: dict, seconds: float, world: int) -> None:
        conf = sum(p["conf"] for p in ranks)
        no_mask = sum(p["no_mask"] for p in ranks)
        images = totals["written"] + totals["already_done"]
        scored = images - no_mask
        report = {"split": self.split, "weights": str(self.weights), "weights_sha256": self.weights_sha256,
                  "settings": settings(self.sc), "predictions": str(self.out_dir), "num_images": images,
                  "scored": scored, "written": totals["written"], "already_done": totals["already_done"],
                  "skipped": totals["skips"], "processes": world, "seconds": round(seconds, 3),
                  "mixed_precision": self.precision}
        crf = "with CRF" if self.sc.crf else "no CRF"
        text = (f"Segmentation of '{self.split}' (scales {list(self.sc.test_scales)}, "
                f"{'flip, ' if self.sc.test_flip else ''}{crf}): {images} images -> {self.out_dir}\n")
        if scored:
            report.update(scores(conf), confusion=conf.tolist())
            table = format_table(iou_per_class(conf), report["miou"])
            text += f"\nmIoU against the masks ({scored} images):\n\n{table}"
        else:
            report["miou"] = None
            text += "\nno ground-truth masks in this split (the test split?): predictions only, for the server\n"
        if no_mask and scored:
            text += f"{no_mask} image(s) without a mask are not scored\n"
        atomic_write(self.manifest_dir / "report.json", json.dumps(report, indent=2), "segmentation report")
        atomic_write(self.manifest_dir / "report.md", text, "segmentation report")
        print(text + f"\nreport: {self.manifest_dir / 'report.json'}")


def segment_eval(cfg: Config) -> int:
    """Predict and score `seg.eval_split` with the trained DeepLab over all ranks; 0, or 75 when preempted."""
    state = distributed_state()
    device = state.device
    net, sha, path = load_seg_model(cfg, device)
    precision = resolve_precision(cfg.seg.infer_precision, device)
    if state.is_main_process:
        print(f"segment-eval: {precision_note(cfg.seg.infer_precision, precision, device)}")
    work = SegPredictWork(cfg, net, sha, path, precision, device)
    return run_per_image(work, cfg.output.run_dir, cfg.data.on_corrupt, cfg.eval.max_listed)
