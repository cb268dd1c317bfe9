"""IRNet's inter-pixel relation labels from CAMs (docs/irnet.md, "Confident regions"): IRNet's
cam_to_ir_label. Two label maps are made from the image's `high_res` CAMs, each a background-score argmax
smoothed by a DenseCRF: with a high background score (confident foreground) and a low one (confident
background). Where the first says an object, that object; where both say background, background (0);
everything else is unsure (255, ignored by the affinity labels).
"""
from __future__ import annotations

import numpy as np

CONF_FG_THRES = 0.30  # run_sample.py --conf_fg_thres
CONF_BG_THRES = 0.05  # run_sample.py --conf_bg_thres
IGNORE = 255

# imutils.crf_inference_label's settings
CRF_ITERATIONS = 10
CRF_GT_PROB = 0.7
CRF_GAUSSIAN = {"sxy": 3, "compat": 3}
CRF_BILATERAL = {"sxy": 50, "srgb": 5, "compat": 10}


def label_unary(labels: np.ndarray, n_labels: int, gt_prob: float = CRF_GT_PROB) -> np.ndarray:
    """(n_labels, H*W) float32 unary energies of a hard label map: -log(gt_prob) for the pixel's label,
    -log((1 - gt_prob) / (n_labels - 1)) for the others (pydensecrf's unary_from_labels with
    zero_unsure=False, which IRNet calls)."""
    flat = np.asarray(labels).reshape(-1)
    # a single label has no "other": its energy is never read, keep it finite
    other = -np.log((1.0 - gt_prob) / (n_labels - 1)) if n_labels > 1 else 0.0
    unary = np.full((n_labels, flat.size), other, dtype=np.float32)
    unary[flat, np.arange(flat.size)] = -np.log(gt_prob)
    return unary


def crf_inference_label(image: np.ndarray, labels: np.ndarray, n_labels: int, iterations: int = CRF_ITERATIONS,
                        gt_prob: float = CRF_GT_PROB) -> np.ndarray:
    """DenseCRF smoothing of a hard (H, W) label map 0..n_labels-1 on an (H, W, 3) uint8 RGB image with
    IRNet's kernels (Gaussian sxy 3 compat 3, bilateral sxy 50 srgb 5 compat 10): (H, W) int64 labels."""
    import pydensecrf.densecrf as dcrf
    h, w = labels.shape
    crf = dcrf.DenseCRF2D(w, h, n_labels)
    crf.setUnaryEnergy(label_unary(labels, n_labels, gt_prob))
    crf.addPairwiseGaussian(**CRF_GAUSSIAN)
    # the extension wants C-contiguous, writable buffers (a read-only array is refused)
    crf.addPairwiseBilateral(rgbim=np.require(image, dtype=np.uint8, requirements=("C", "W")), **CRF_BILATERAL)
    q = np.asarray(crf.inference(iterations)).reshape(n_labels, h, w)
    return np.argmax(q, axis=0)


def threshold_argmax(high_res: np.ndarray, bg_score: float) -> np.ndarray:
    """Argmax over a constant `bg_score` channel followed by the (k, H, W) CAMs: (H, W) int64, 0 =
    background, i = the i-th CAM."""
    k, h, w = high_res.shape
    return np.argmax(np.concatenate([np.full((1, h, w), bg_score, high_res.dtype), high_res]), axis=0)


def combine_confident(fg_conf: np.ndarray, bg_conf: np.ndarray) -> np.ndarray:
    """IRNet's rule on two VOC label maps: the foreground map's object where it has one, 0 where both are
    background, 255 elsewhere. (H, W) uint8."""
    out = np.where(fg_conf > 0, fg_conf, IGNORE)
    out[(fg_conf == 0) & (bg_conf == 0)] = 0
    return out.astype(np.uint8)


def cam_to_ir_label(image: np.ndarray, high_res: np.ndarray, keys: np.ndarray, fg_thres: float = CONF_FG_THRES,
                    bg_thres: float = CONF_BG_THRES, iterations: int = CRF_ITERATIONS,
                    gt_prob: float = CRF_GT_PROB) -> np.ndarray:
    """IRNet's relation label map of one image: (H, W) uint8, 0 background, 1..20 VOC classes, 255 unsure.

    `image` (H, W, 3) uint8 RGB, `high_res` the (k, H, W) max-normalised CAMs of the image's positive
    classes `keys` (class indices 0..19), as in a CamRecord."""
    k, h, w = high_res.shape
    if image.shape != (h, w, 3):
        raise ValueError(f"image {image.shape} does not match CAMs {high_res.shape}")
    lut = np.concatenate([[0], np.asarray(keys, dtype=np.int64) + 1])
    if k == 0:  # only background: both maps are all 0, so is the result (IRNet's CRF of one label agrees)
        return np.zeros((h, w), np.uint8)
    fg_conf = lut[crf_inference_label(image, threshold_argmax(high_res, fg_thres), k + 1, iterations, gt_prob)]
    bg_conf = lut[crf_inference_label(image, threshold_argmax(high_res, bg_thres), k + 1, iterations, gt_prob)]
    return combine_confident(fg_conf, bg_conf)
