"""Segmentation metrics for CAMs: label maps from CAMs, confusion matrices, IoU, threshold sweeps.

All pure NumPy. A sweep is computed in one pass: per pixel only the best foreground score and its class
matter, so each image adds to a histogram over (ground truth, foreground class, threshold bin), and the
confusion matrix for every threshold follows from cumulative sums.
"""
from __future__ import annotations

import functools

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
    if high_res.shape[0] == 0:
        idx = gt_rows(gt, n, ignore_index) * (n * (t + 1))  # no foreground: all background, bin 0
    else:
        top, best = best_foreground(high_res)
        fg = np.asarray(keys, dtype=np.intp) + 1
        idx = _cell_index(gt, best, fg, n, t, ignore_index)
        idx += threshold_bins(top, np.asarray(thresholds, dtype=np.float32))
    return np.bincount(idx.ravel(), minlength=(n + 1) * n * (t + 1)).reshape(n + 1, n, t + 1)[:n]


def gt_rows(gt: np.ndarray, num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """The mask as intp histogram rows: its class, or num_classes (an extra row, dropped at the end) for
    ignored pixels. Values must have been checked (mask_value_problem)."""
    rows = gt.astype(np.intp)
    rows[gt == ignore_index] = num_classes
    return rows


def _cell_index(gt: np.ndarray, best: np.ndarray, fg: np.ndarray, n: int, t: int, ignore_index: int) -> np.ndarray:
    """Per pixel the histogram cell (gt row, foreground class) * (t + 1), intp. Where the checked mask
    values and the channel index each fit a byte (VOC), one look-up in a table over both codes."""
    k = len(fg)
    if not (0 <= ignore_index < 256 and n <= 256 and k <= 256):
        return (gt_rows(gt, n, ignore_index) * n + fg[best]) * (t + 1)
    shift = max(1, (k - 1).bit_length())
    rows = np.arange(256, dtype=np.intp)
    rows[ignore_index] = n
    table = (rows[:, None] * n + np.pad(fg, (0, (1 << shift) - k))[None, :]) * (t + 1)
    code = gt.astype(np.uint16)
    code <<= shift
    code |= best
    return table.reshape(-1)[code]


def best_foreground(high_res: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel of (k, H, W) scores, k >= 1: the highest score (float32) and the first channel holding it
    (uint8 for k <= 256, as argmax picks it).

    A running maximum over the few channels, cheaper than argmax and a gather over (k, H, W). Channel i
    wins where it is strictly greater than all before it, and i exceeds every earlier index, so
    max(best, better * i) writes i exactly there (masked writes are several times slower in NumPy).
    """
    k = high_res.shape[0]
    top = high_res[0].astype(np.float32)
    best = np.zeros(top.shape, np.uint8 if k <= 256 else np.intp)
    for i in range(1, k):
        channel = high_res[i].astype(np.float32, copy=False)
        better = np.greater(channel, top).view(np.uint8).astype(best.dtype, copy=False)
        np.maximum(best, better * best.dtype.type(i), out=best)
        np.maximum(top, channel, out=top)
    return top, best


def threshold_bins(top: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Per pixel the number of thresholds strictly below its score, as searchsorted(thresholds, top, 'left')
    gives it, in the smallest integer type that holds it. One threshold is one comparison; a sweep looks
    the bin up by the score's float32 bits (`_bucket_table`) and searches only the few pixels whose
    bucket holds a threshold."""
    if len(thresholds) == 1:
        return np.greater(top, thresholds[0]).view(np.uint8)
    table = _bucket_table(np.ascontiguousarray(thresholds, dtype=np.float32).tobytes())
    bins = table[top.view(np.uint32) >> _BUCKET_SHIFT]
    unsure = np.flatnonzero(bins < 0)
    if len(unsure):
        bins.reshape(-1)[unsure] = np.searchsorted(thresholds, top.reshape(-1)[unsure], side="left")
    return bins


# float32 bits >> 13 keep sign, exponent and 10 mantissa bits: every float16 value (how `vwe infer` stores
# CAMs by default) is the lowest value of its own bucket, and a bucket is an interval of values
_BUCKET_SHIFT = 13


@functools.lru_cache(maxsize=8)
def _bucket_table(thresholds: bytes) -> np.ndarray:
    """For each of the 2^19 buckets the number of thresholds below all of its values, or -1 where a
    threshold falls inside it (those pixels are searched). Built once per threshold list (~20 ms)."""
    th = np.frombuffer(thresholds, np.float32)
    first = np.arange(1 << (32 - _BUCKET_SHIFT), dtype=np.uint32) << _BUCKET_SHIFT
    last = first | np.uint32((1 << _BUCKET_SHIFT) - 1)
    lo = np.searchsorted(th, first.view(np.float32), side="left")
    hi = np.searchsorted(th, last.view(np.float32), side="left")
    dtype = np.int16 if len(th) < np.iinfo(np.int16).max else np.int32
    return np.where(lo == hi, lo, -1).astype(dtype)


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
