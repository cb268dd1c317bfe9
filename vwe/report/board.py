"""Results in TensorBoard: each evaluation's CAM mIoU (and the sweep's best) and a few CAM pictures,
logged into the run's `tb/` folder beside the training curves, at the training step of the weights."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from vwe.formats.config import Config
from vwe.report.miou import SHORT_NAMES

PICTURES = 4  # images shown per evaluation


def trained_steps(run_dir: Path) -> int:
    """The optimizer steps behind the run's weights (summary.json), 0 when unknown."""
    try:
        return int(json.loads((run_dir / "summary.json").read_text())["steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def log_evaluation(cfg: Config, report: dict, cam_dir: Path) -> None:
    """Scalars and pictures of one evaluation (rank 0), when output.tensorboard is on."""
    if not cfg.output.tensorboard:
        return
    from torch.utils.tensorboard import SummaryWriter
    run_dir = Path(cfg.output.run_dir)
    step = trained_steps(run_dir)
    with SummaryWriter(str(run_dir / "tb")) as writer:
        writer.add_scalar("eval/miou", report["miou"], step)
        for name, iou in zip(SHORT_NAMES, report["iou"].values()):
            if iou is not None:
                writer.add_scalar(f"eval_iou/{name}", iou, step)
        if "sweep" in report:
            writer.add_scalar("eval/best_miou", report["sweep"]["best_miou"], step)
            writer.add_scalar("eval/best_bkg", report["sweep"]["best_bkg"], step)
        for key, picture in _pictures(cfg, cam_dir):
            writer.add_image(f"cams/{key}", picture, step, dataformats="HWC")


def _pictures(cfg: Config, cam_dir: Path) -> list[tuple[str, np.ndarray]]:
    """Picture rows (image, ground truth, CAMs, prediction) of the first images that have a CAM."""
    from vwe.formats.cams import read_cam
    from vwe.runtime.errors import DataError
    from vwe.report.miou import mask_value_problem
    from vwe.data.loader import infer_samples
    from vwe.report.visualize import picture_row
    rows = []
    samples = infer_samples(cfg.data, cfg.infer, 0, 1, with_scales=False)
    try:
        for sample in samples:
            path = cam_dir / f"{sample['key']}.npz"
            if not path.is_file():
                continue
            mask = sample["mask"].numpy() if sample["mask"] is not None else None
            if mask is not None and mask_value_problem(mask, cfg.model.num_classes + 1):
                continue  # evaluation skipped or refused it; not a picture to show
            try:
                rec = read_cam(path, cfg.model.num_classes)
            except DataError:
                continue
            image = sample["image"].permute(1, 2, 0).numpy()
            rows.append((sample["key"], np.asarray(picture_row(image, mask, rec.keys, rec.high_res, cfg.eval.bkg,
                                                                sample["key"]))))
            if len(rows) == PICTURES:
                break
    finally:
        samples.close()
    return rows
