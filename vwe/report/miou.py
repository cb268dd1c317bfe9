"""Segmentation metrics for CAMs: label maps from CAMs, confusion matrices, IoU, threshold sweeps.

All pure NumPy. A sweep is computed in one pass: per pixel only the best foreground score and its class
matter, so each image adds to a histogram over (ground truth, foreground class, threshold bin), and the
confusion matrix for every threshold follows from cumulative sums.
"""
from __future__ import annotations

import numpy as np

# Paper's column order: bkg, then the 20 VOC classes in index order, then mIoU.
SHORT_NAMES = ("bkg", "aero", "bike", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "table", "dog", "horse", "motor", "person", "plant", "sheep", "sofa", "train", "tv")


IGNORE_INDEX = 255  # ground-truth pixels that are not scored (object boundaries in VOC)


def mask_value_problem(gt: np.ndarray, num_classes: int, ignore_index: int = IGNORE_INDEX) -> str | None:
    """None when every value of the mask is a class 0..num_classes-1 or ignore_index; else a description
    of the offending values ("holds value(s) 30, 41 (12 pixels) outside 0..20 and 255")."""
    if gt.size == 0 or (gt.min() >= 0 and gt.max() < num_classes):
        return None  # the common case, without building a boolean mask
    wrong = (gt < 0) | ((gt >= num_classes) & (gt != ignore_index))
    if not wrong.any():
        return None
    values = np.unique(gt[wrong])
    shown = ", ".join(str(int(v)) for v in values[:10]) + (", ..." if len(values) > 10 else "")
    return (f"holds value(s) {shown} ({int(wrong.sum())} pixels) outside 0..{num_classes - 1} "
            f"and {ignore_index}")


def cam_to_label(high_res: np.ndarray, keys: np.ndarray, bkg: float) -> np.ndarray:
    """Label map (H, W): background channel of constant `bkg` prepended, argmax, channel i -> keys[i-1]+1."""
    k, h, w = high_res.shape
    scores = np.concatenate([np.full((1, h, w), bkg, dtype=np.float32), high_res.astype(np.float32)])
    lut = np.concatenate([[0], np.asarray(keys, dtype=np.int64) + 1])
    return lut[np.argmax(scores, axis=0)]


def confusion_matrix(pred: np.ndarray, gt: np.ndarray, num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """(num_classes, num_classes) int64 counts, rows = ground truth, columns = prediction."""
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground truth {gt.shape}")
    for name, a in (("ground truth", gt), ("prediction", np.where(gt == ignore_index, 0, pred))):
        problem = mask_value_problem(a, num_classes, ignore_index)
        if problem:
            raise ValueError(f"{name} {problem}")
    valid = gt != ignore_index
    idx = gt[valid].astype(np.int64) * num_classes + pred[valid].astype(np.int64)
    return np.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def iou_per_class(conf: np.ndarray) -> np.ndarray:
    """IoU = TP / (TP + FP + FN) per class; NaN for classes absent from the ground truth."""
    conf = conf.astype(np.float64)
    tp = np.diag(conf)
    gt_count = conf.sum(axis=1)
    union = gt_count + conf.sum(axis=0) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = tp / union
    iou[gt_count == 0] = np.nan
    return iou


def mean_iou(conf: np.ndarray) -> float:
    """Mean IoU over the classes present in the ground truth."""
    iou = iou_per_class(conf)
    return float(np.nanmean(iou)) if np.any(~np.isnan(iou)) else float("nan")


def pixel_accuracy(conf: np.ndarray) -> float:
    total = conf.sum()
    return float(np.trace(conf) / total) if total else float("nan")


def scores(conf: np.ndarray) -> dict:
    """A report's scores of one confusion matrix: mIoU, pixel accuracy and each class's IoU by short name
    (None for a class absent from masks and predictions)."""
    iou = iou_per_class(conf)
    return {"miou": mean_iou(conf), "pixel_accuracy": pixel_accuracy(conf),
            "iou": {name: (None if np.isnan(v) else float(v)) for name, v in zip(SHORT_NAMES, iou)}}


def sweep_thresholds(start: float, stop: float, step: float, extra: tuple[float, ...] = ()) -> np.ndarray:
    """Sorted, de-duplicated float32 thresholds start..stop (inclusive) plus `extra`."""
    n = int(np.floor((stop - start) / step + 1e-6)) + 1
    grid = np.round(start + step * np.arange(n), 6)
    return np.unique(np.concatenate([grid, np.asarray(extra, dtype=np.float64)]).astype(np.float32))


def sweep_histogram(high_res: np.ndarray, keys: np.ndarray, gt: np.ndarray, thresholds: np.ndarray,
                    num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """One image's counts over (gt class, foreground class, threshold bin): shape (N, N, T+1).

    Bin j holds pixels whose best foreground score exceeds exactly j thresholds, so at threshold t_j
    a pixel is predicted foreground iff its bin is > j (ties go to background, as argmax does).
    """
    n, t = num_classes, len(thresholds)
    if high_res.shape[1:] != gt.shape:
        raise ValueError(f"CAM size {high_res.shape[1:]} differs from mask size {gt.shape}")
    problem = mask_value_problem(gt, n, ignore_index)
    if problem:  # a value n..254 would otherwise land in the ignored row below and vanish
        raise ValueError(f"mask {problem}")
    g = gt.astype(np.intp)
    g[gt == ignore_index] = n  # an extra row for ignored pixels, dropped at the end (no masked copies)
    k = high_res.shape[0]
    if k == 0:
        fg, top = 0, None
    else:
        # running max over the few kept channels (cheaper than argmax + gather over (k, H, W));
        # strictly greater keeps the first maximum, as argmax does
        lut = np.asarray(keys, dtype=np.intp) + 1
        top = high_res[0].astype(np.float32)
        best = None
        for i in range(1, k):
            channel = high_res[i].astype(np.float32)
            better = channel > top
            if best is None:
                best = better.astype(np.intp)
            else:
                np.putmask(best, better, i)
            np.maximum(top, channel, out=top)
        fg = lut[0] if best is None else lut[best]
    if top is None:
        bins = 0
    elif t == 1:
        bins = (top > thresholds[0]).astype(np.intp)
    else:
        bins = np.searchsorted(thresholds, top, side="left")
    idx = (g * n + fg) * (t + 1) + bins
    return np.bincount(idx.ravel(), minlength=(n + 1) * n * (t + 1)).reshape(n + 1, n, t + 1)[:n]


def confusions_from_histogram(hist: np.ndarray) -> np.ndarray:
    """(T, N, N) confusion matrices, one per threshold, from a summed sweep histogram (N, N, T+1)."""
    n, _, t1 = hist.shape
    # above[..., j] = pixels whose bin > j: foreground at threshold j
    rev = np.cumsum(hist[..., ::-1], axis=-1)[..., ::-1]
    above = rev[..., 1:]                              # (N, N, T)
    at_or_below = hist.sum(axis=-1, keepdims=True) - above
    conf = np.moveaxis(above, -1, 0).copy()           # (T, N, N)
    conf[:, :, 0] += np.moveaxis(at_or_below.sum(axis=1), -1, 0)
    return conf


def format_table(iou: np.ndarray, miou: float, names: tuple[str, ...] = SHORT_NAMES) -> str:
    """Markdown table in the paper's column order, values in percent."""
    cells = ["-" if np.isnan(v) else f"{100 * v:.1f}" for v in iou] + [f"{100 * miou:.1f}"]
    head = list(names[: len(iou)]) + ["mIoU"]
    return "| " + " | ".join(head) + " |\n|" + "---|" * len(head) + "\n| " + " | ".join(cells) + " |\n"
