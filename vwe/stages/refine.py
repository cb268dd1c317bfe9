"""Pseudo labels from CAMs (docs/method.md, "CRF refinement"): DenseCRF or the background-score argmax.

Each rank takes its part of `data.infer_split` (the inference split, every image exactly once), reads the
image's CAM, writes `<out_dir>/<id>.png` (index PNG, values 0..20) and optionally a VOC-palette colour
copy in `<out_dir>/color/`, and scores the labels against the split's masks. Every PNG carries, in a text
chunk, the SHA-256 of the CAM file and the settings it was made with: a re-run skips images whose PNG
matches both and redoes the rest. Rank 0 writes `report.json` and `report.md`.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from vwe.data.voc import NUM_LABELS
from vwe.data.loader import infer_samples
from vwe.formats.cams import cam_dir_for
from vwe.formats.config import Config, RefineConfig
from vwe.formats.labels import encode_label_png
from vwe.report.miou import cam_to_label, confusion_matrix, format_table, iou_per_class, scores
from vwe.runtime.errors import DataError, VweError
from vwe.runtime.files import atomic_write
from vwe.runtime.skips import SkipPolicy
from vwe.stages.camlabels import CamLabelWork
from vwe.stages.perimage import Output, run_per_image

CRF_EXTRA = "pip install 'vwe[crf]' (pydensecrf2), or use refine.method=threshold"


def label_dir_for(cfg: Config) -> Path:
    """Where the label PNGs go: `refine.out_dir`, or `<run_dir>/pseudo_labels`."""
    return Path(cfg.refine.out_dir) if cfg.refine.out_dir else Path(cfg.output.run_dir) / "pseudo_labels"


def refine_cam_dir(cfg: Config) -> Path:
    """The CAMs to refine: `refine.cam_dir`, or the run's CAM folder."""
    return Path(cfg.refine.cam_dir) if cfg.refine.cam_dir else cam_dir_for(cfg)


def settings(rc: RefineConfig) -> dict:
    """The settings a label map depends on (the CRF ones only for the CRF)."""
    out = {"method": rc.method, "bkg": rc.bkg}
    if rc.method == "crf":
        out.update(gaussian_sxy=rc.gaussian_sxy, gaussian_compat=rc.gaussian_compat,
                   bilateral_sxy=rc.bilateral_sxy, bilateral_srgb=rc.bilateral_srgb,
                   bilateral_compat=rc.bilateral_compat, iterations=rc.iterations)
    return out


def crf_probabilities(high_res: np.ndarray, bkg: float) -> np.ndarray:
    """Softmax over channels of the stack (constant `bkg`, the k CAMs): (k+1, H, W) float32."""
    k, h, w = high_res.shape
    logits = np.concatenate([np.full((1, h, w), bkg, np.float32), high_res.astype(np.float32)])
    e = np.exp(logits - logits.max(axis=0, keepdims=True))
    return e / e.sum(axis=0, keepdims=True)


def crf_labels(image: np.ndarray, high_res: np.ndarray, keys: np.ndarray, rc: RefineConfig) -> np.ndarray:
    """DenseCRF label map (H, W) uint8 from an (H, W, 3) uint8 RGB image and its (k, H, W) CAMs:
    unary -log(softmax), a Gaussian and a bilateral Potts kernel, `rc.iterations` mean-field steps;
    channel 0 -> background, channel i -> keys[i-1] + 1."""
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax
    k, h, w = high_res.shape
    if image.shape != (h, w, 3) or image.dtype != np.uint8:
        raise ValueError(f"image {image.shape} {image.dtype} does not match CAMs {high_res.shape}")
    if k == 0:  # no positive class: background is the only label
        return np.zeros((h, w), np.uint8)
    crf = dcrf.DenseCRF2D(w, h, k + 1)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(crf_probabilities(high_res, rc.bkg))))
    crf.addPairwiseGaussian(sxy=rc.gaussian_sxy, compat=rc.gaussian_compat)
    # the extension wants C-contiguous, writable buffers (a read-only array is refused)
    crf.addPairwiseBilateral(sxy=rc.bilateral_sxy, srgb=rc.bilateral_srgb,
                             rgbim=np.require(image, requirements=("C", "W")), compat=rc.bilateral_compat)
    q = np.asarray(crf.inference(rc.iterations), dtype=np.float32).reshape(k + 1, h, w)
    lut = np.concatenate([[0], np.asarray(keys, dtype=np.int64) + 1]).astype(np.uint8)
    return lut[np.argmax(q, axis=0)]


def threshold_labels(high_res: np.ndarray, keys: np.ndarray, bkg: float) -> np.ndarray:
    """The evaluation's label map (constant background score, argmax) as (H, W) uint8."""
    return cam_to_label(high_res, keys, bkg).astype(np.uint8)


def check_crf_available() -> None:
    try:
        import pydensecrf.densecrf  # noqa: F401
    except ImportError:
        raise VweError(f"refine.method=crf needs the pydensecrf module: {CRF_EXTRA}") from None


class LabelWork(CamLabelWork):
    """One image's pseudo label from its CAM (the per-image part of `vwe refine`), scored against its mask."""
    name, what = "refine", "pseudo label"

    def __init__(self, cfg: Config, cam_dir: Path, out_dir: Path) -> None:
        super().__init__()
        self.cfg, self.rc, self.cam_dir, self.out_dir = cfg, cfg.refine, cam_dir, out_dir
        self.split, self.data_root = cfg.data.infer_split, cfg.data.root
        self.fingerprint = settings(cfg.refine)
        self.conf = np.zeros((NUM_LABELS, NUM_LABELS), np.int64)
        self.base = np.zeros_like(self.conf)  # the threshold labels at the same bkg: what the CRF changed
        self.no_mask = 0

    def samples(self, rank: int, world: int, skips: SkipPolicy) -> Iterator[dict]:
        return infer_samples(self.cfg.data, self.cfg.infer, rank, world, with_scales=False,
                             with_image=self.rc.method == "crf", skips=skips)

    def current(self, sample: dict, path: Path) -> tuple[bool, np.ndarray | None]:
        color = self.out_dir / "color" / f"{sample['key']}.png"
        done, label = super().current(sample, path)
        return (done, label) if not self.rc.color or color.exists() else (False, None)

    def compute(self, samples: list[dict]) -> list[Output]:
        outputs = []
        for sample in samples:
            rec = sample["cam"]
            if self.rc.method == "crf":
                label = crf_labels(sample["image"].permute(1, 2, 0).numpy(), rec.high_res, rec.keys, self.rc)
            else:
                label = threshold_labels(rec.high_res, rec.keys, self.rc.bkg)
            extra = {f"color/{sample['key']}.png": encode_label_png(label, sample["source"], palette=True)} \
                if self.rc.color else {}
            outputs.append(Output(sample["key"], encode_label_png(label, sample["source"], palette=False),
                                  label, extra))
        return outputs

    def account(self, sample: dict, label: np.ndarray) -> None:
        if sample["mask"] is None:
            self.no_mask += 1
            return
        gt, rec = sample["mask"].numpy(), sample["cam"]
        self.conf += confusion_matrix(label, gt, NUM_LABELS)
        self.base += confusion_matrix(threshold_labels(rec.high_res, rec.keys, self.rc.bkg), gt, NUM_LABELS)

    def rank_totals(self) -> dict:
        return {"conf": self.conf, "base": self.base, "no_mask": self.no_mask, **super().rank_totals()}

    def manifest(self) -> dict:
        return {"cam_dir": str(self.cam_dir), "weights_sha256": self.cam_weights_sha256, "settings": self.fingerprint}

    def report(self, ranks: list[dict], totals: dict, seconds: float, world: int) -> None:
        _report(self.cfg, sum(p["conf"] for p in ranks), sum(p["base"] for p in ranks),
                {**totals, "no_mask": sum(p["no_mask"] for p in ranks)}, self.cam_dir, self.out_dir,
                self.cam_weights_sha256, seconds, world)


def refine(cfg: Config) -> int:
    """Label PNGs for every image of data.infer_split from its CAM, over all ranks; rank 0 reports.
    Returns 0, or PREEMPT_EXIT_CODE after SIGUSR1/SIGTERM (labels written so far are kept)."""
    if cfg.refine.method == "crf":
        check_crf_available()
    cam_dir, out_dir = refine_cam_dir(cfg), label_dir_for(cfg)
    if not cam_dir.is_dir():
        raise DataError(f"CAM folder {cam_dir} does not exist: run `vwe infer` first, or set refine.cam_dir")
    return run_per_image(LabelWork(cfg, cam_dir, out_dir), cfg.output.run_dir, cfg.data.on_corrupt,
                         cfg.eval.max_listed)


def _report(cfg: Config, conf: np.ndarray, base: np.ndarray, totals: dict, cam_dir: Path, out_dir: Path,
            weights_sha256: str, seconds: float, world: int) -> None:
    rc = cfg.refine
    num_images = totals["written"] + totals["already_done"]
    scored = num_images - totals["no_mask"]
    report = {"split": cfg.data.infer_split, "settings": settings(rc), "cam_dir": str(cam_dir),
              "out_dir": str(out_dir), "weights_sha256": weights_sha256, "num_images": num_images, "scored": scored,
              **totals, "processes": world, "seconds": round(seconds, 3)}
    name = "CRF" if rc.method == "crf" else "threshold"
    text = (f"Pseudo labels ({name}, bkg={rc.bkg}) for '{cfg.data.infer_split}': {num_images} images "
            f"({totals['written']} written, {totals['already_done']} already done) -> {out_dir}\n")
    if scored:
        report.update(scores(conf), confusion=conf.tolist())
        table = format_table(iou_per_class(conf), report["miou"])
        text += f"\nmIoU against the masks ({scored} images):\n\n{table}"
        if rc.method == "crf":
            report["threshold"] = scores(base)
            text += (f"\nthe CAMs' own label maps at bkg={rc.bkg} (no CRF): mIoU "
                     f"{100 * report['threshold']['miou']:.1f}\n")
    else:
        report["miou"] = None
        text += "\nno ground-truth masks in this split: nothing scored\n"
    if totals["no_mask"] and scored:
        text += f"{totals['no_mask']} image(s) without a mask are not scored\n"
    if totals["skipped"]:
        text += f"{totals['skipped']} corrupt sample(s) skipped (data.on_corrupt=skip)\n"
    atomic_write(out_dir / "report.json", json.dumps(report, indent=2), "refine report")
    atomic_write(out_dir / "report.md", text, "refine report")
    print(text + f"\nreport: {out_dir / 'report.json'}")
