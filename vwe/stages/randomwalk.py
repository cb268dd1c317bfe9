"""The IRNet stage, part 3 (docs/irnet.md, "Running it"): `vwe random-walk`, IRNet's make_sem_seg_labels on
the per-image pass. Per image of `irn.label_split`: the boundary map of the trained relation network (the
image and its mirror), the image's strided CAMs walked over the boundary-based transition matrix, and the
label map -> `<irn dir>/pseudo_labels/<id>.png` (an index PNG carrying the SHA-256s of the weights and
the CAM and the walk's settings), scored against the split's masks (IRNet's eval_sem_seg) beside the
CAMs' own label maps at eval.bkg. Runs on the device where one is available.
"""
from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from vwe.data.loader import infer_samples
from vwe.data.transforms import normalize
from vwe.formats.checkpoint import FINAL_WEIGHTS_NAME, load_weights, stage_weights
from vwe.formats.config import Config, IrnConfig
from vwe.formats.labels import encode_label_png
from vwe.labels.randomwalk import sem_seg_labels
from vwe.nets.irn import NUM_LABELS, IRNet, infer_edge
from vwe.report.miou import cam_to_label, confusion_matrix, format_table, iou_per_class, scores
from vwe.runtime.dist import distributed_state
from vwe.runtime.errors import CheckpointError
from vwe.runtime.files import atomic_write, file_sha256
from vwe.runtime.skips import SkipPolicy
from vwe.stages.irn import check_cam_dir, irn_cam_dir, irn_dir
from vwe.stages.camlabels import CamLabelWork
from vwe.stages.perimage import Output, run_per_image


def walk_label_dir(cfg: Config) -> Path:
    """Where the random-walk pseudo labels go: `<irn dir>/pseudo_labels`."""
    return irn_dir(cfg) / "pseudo_labels"


def walk_settings(ic: IrnConfig) -> dict:
    """What a walk label map depends on besides the weights and the CAM."""
    return {"beta": ic.beta, "exp_times": ic.exp_times, "walk_radius": ic.walk_radius,
            "sem_seg_bg_thres": ic.sem_seg_bg_thres, "crop_size": ic.crop_size}


def irn_weights_path(cfg: Config) -> Path:
    """`irn.weights` (a file or a checkpoint folder), else the stage's exported final weights."""
    return stage_weights(cfg.irn.weights, irn_dir(cfg) / FINAL_WEIGHTS_NAME, "irn.weights", "vwe irn-train")


def load_irn_model(cfg: Config, device: torch.device) -> tuple[IRNet, str, Path]:
    """The trained relation network in eval mode (its stored irn.backbone decides the shape)."""
    path = irn_weights_path(cfg)
    state, saved = load_weights(path)
    backbone = (saved or {}).get("irn", {}).get("backbone", cfg.irn.backbone)
    bad = [k for k, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise CheckpointError(f"relation network weights {path}: {len(bad)} tensor(s) hold NaN or Inf "
                              f"(e.g. {', '.join(bad[:3])}); the training that wrote them diverged")
    net = IRNet(backbone)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"relation network weights {path} do not fit IRNet ({backbone}): {e}") from None
    return net.eval().to(device), file_sha256(path), path


@contextlib.contextmanager
def exact_float32() -> Iterator[None]:
    """float32 matmuls without TF32 (docs/irnet.md: T^256 amplifies TF32's 10-bit rounding)."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


class RandomWalkWork(CamLabelWork):
    """One image's random-walk pseudo label (the per-image part of `vwe random-walk`), scored on its mask."""
    name, what = "random-walk", "pseudo label"
    strided = True  # the walk starts from the strided CAM

    def __init__(self, cfg: Config, net: IRNet, weights_sha256: str, weights: Path, cam_dir: Path,
                 device: torch.device) -> None:
        super().__init__()
        self.cfg, self.ic, self.net, self.device = cfg, cfg.irn, net, device
        self.split, self.data_root = cfg.irn.label_split, cfg.data.root
        self.cam_dir, self.out_dir = cam_dir, walk_label_dir(cfg)
        self.weights, self.weights_sha256 = weights, weights_sha256
        self.fingerprint = {"weights_sha256": weights_sha256, **walk_settings(cfg.irn)}
        self.conf = np.zeros((NUM_LABELS, NUM_LABELS), np.int64)
        self.base = np.zeros_like(self.conf)  # the CAMs' own label maps at eval.bkg
        self.no_mask = 0

    def samples(self, rank: int, world: int, skips: SkipPolicy) -> Iterator[dict]:
        return infer_samples(self.cfg.data, self.cfg.infer, rank, world, split=self.split, with_scales=False,
                             with_image=True, skips=skips)


    @torch.no_grad()
    def compute(self, samples: list[dict]) -> list[Output]:
        ic, outputs = self.ic, []
        with exact_float32():
            for sample in samples:
                rec = sample["cam"]
                edge = infer_edge(self.net, normalize(sample["image"].to(self.device)), ic.crop_size)
                if not torch.isfinite(edge).all():
                    raise CheckpointError(f"relation network weights {self.weights} give a non-finite boundary "
                                          f"map for image {sample['key']!r}; nothing written for it")
                cams = torch.from_numpy(np.asarray(rec.cam, np.float32)).to(self.device)
                label = sem_seg_labels(edge, cams, rec.keys, tuple(sample["size"]), ic.beta, ic.exp_times,
                                       ic.sem_seg_bg_thres, ic.walk_radius)
                outputs.append(Output(sample["key"], encode_label_png(label, sample["source"], palette=False), label))
        return outputs

    def account(self, sample: dict, label: np.ndarray) -> None:
        if sample["mask"] is None:
            self.no_mask += 1
            return
        gt, rec = sample["mask"].numpy(), sample["cam"]
        self.conf += confusion_matrix(label, gt, NUM_LABELS)
        self.base += confusion_matrix(cam_to_label(rec.high_res, rec.keys, self.cfg.eval.bkg), gt, NUM_LABELS)

    def rank_totals(self) -> dict:
        return {"conf": self.conf, "base": self.base, "no_mask": self.no_mask, **super().rank_totals()}

    def manifest(self) -> dict:
        return {"cam_dir": str(self.cam_dir), "cam_weights_sha256": self.cam_weights_sha256,
                "weights": str(self.weights), "settings": self.fingerprint}

    def report(self, ranks: list[dict], totals: dict, seconds: float, world: int) -> None:
        conf, base = sum(p["conf"] for p in ranks), sum(p["base"] for p in ranks)
        no_mask = sum(p["no_mask"] for p in ranks)
        images = totals["written"] + totals["already_done"]
        scored = images - no_mask
        report = {"split": self.split, "settings": walk_settings(self.ic), "weights": str(self.weights),
                  "weights_sha256": self.weights_sha256, "cam_dir": str(self.cam_dir),
                  "cam_weights_sha256": self.cam_weights_sha256, "out_dir": str(self.out_dir), "num_images": images,
                  "scored": scored, **{k: totals[k] for k in ("written", "already_done", "stale_replaced")},
                  "skipped": totals["skips"], "processes": world, "seconds": round(seconds, 3),
                  "device": str(self.device)}
        ic = self.ic
        text = (f"Pseudo labels by random walk (beta {ic.beta}, exp_times {ic.exp_times}, radius {ic.walk_radius}, "
                f"sem_seg_bg_thres {ic.sem_seg_bg_thres}) for '{self.split}': {images} images -> {self.out_dir}\n")
        if scored:
            report.update(scores(conf), confusion=conf.tolist(), cam_threshold={"bkg": self.cfg.eval.bkg,
                                                                                  **scores(base)})
            text += f"\nmIoU against the masks ({scored} images):\n\n{format_table(iou_per_class(conf), report['miou'])}"
            text += (f"\nthe CAMs' own label maps at eval.bkg={self.cfg.eval.bkg} (no walk): mIoU "
                     f"{100 * report['cam_threshold']['miou']:.1f}\n")
        else:
            report["miou"] = None
            text += "\nno ground-truth masks in this split: nothing scored\n"
        if no_mask and scored:
            text += f"{no_mask} image(s) without a mask are not scored\n"
        atomic_write(self.out_dir / "report.json", json.dumps(report, indent=2), "random-walk report")
        atomic_write(self.out_dir / "report.md", text, "random-walk report")
        print(text + f"\nreport: {self.out_dir / 'report.json'}")


def random_walk(cfg: Config) -> int:
    """Random-walk pseudo labels for every image of irn.label_split over all ranks; rank 0 reports.
    Returns 0, or PREEMPT_EXIT_CODE after SIGUSR1/SIGTERM (labels written so far are kept)."""
    cam_dir = irn_cam_dir(cfg)
    check_cam_dir(cam_dir)
    device = distributed_state().device
    net, sha, path = load_irn_model(cfg, device)
    work = RandomWalkWork(cfg, net, sha, path, cam_dir, device)
    return run_per_image(work, cfg.output.run_dir, cfg.data.on_corrupt, cfg.eval.max_listed)
