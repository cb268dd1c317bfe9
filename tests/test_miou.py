"""Metrics: label maps from CAMs, confusion matrix, IoU, and the one-pass threshold sweep."""
import numpy as np
import pytest

from vwe.report.miou import (cam_to_label, confusion_matrix, confusions_from_histogram, format_table,
                         iou_per_class, mean_iou, pixel_accuracy, sweep_histogram, sweep_thresholds)


def test_cam_to_label_maps_channels_to_classes():
    high_res = np.array([[[0.9, 0.1], [0.5, 0.0]],     # class index 6 (car)
                         [[0.2, 0.8], [0.6, 0.1]]])    # class index 14 (person)
    label = cam_to_label(high_res, np.array([6, 14]), bkg=0.3)
    assert label.tolist() == [[7, 15], [15, 0]]
    # ties go to background (argmax takes the first channel)
    assert cam_to_label(np.full((1, 1, 1), 0.3), np.array([2]), bkg=0.3).tolist() == [[0]]
    assert cam_to_label(np.zeros((0, 2, 3)), np.array([], dtype=int), bkg=0.1).tolist() == [[0] * 3] * 2


def test_confusion_matrix_by_hand():
    gt = np.array([[0, 0, 1], [1, 2, 255]])
    pred = np.array([[0, 1, 1], [2, 2, 0]])
    conf = confusion_matrix(pred, gt, num_classes=3)
    expected = np.array([[1, 1, 0],
                         [0, 1, 1],
                         [0, 0, 1]])
    assert (conf == expected).all()
    iou = iou_per_class(conf)
    # class 0: TP 1, FP 0, FN 1 -> 1/2; class 1: TP 1, FP 1, FN 1 -> 1/3; class 2: TP 1, FP 1 -> 1/2
    assert iou == pytest.approx([1 / 2, 1 / 3, 1 / 2])
    assert mean_iou(conf) == pytest.approx((1 / 2 + 1 / 3 + 1 / 2) / 3)
    assert pixel_accuracy(conf) == pytest.approx(3 / 5)


def test_miou_ignores_classes_absent_from_ground_truth():
    gt = np.array([0, 0, 1, 1])
    pred = np.array([0, 2, 1, 1])   # class 2 predicted but never in the ground truth
    conf = confusion_matrix(pred, gt, num_classes=3)
    iou = iou_per_class(conf)
    assert np.isnan(iou[2]) and iou[0] == pytest.approx(0.5) and iou[1] == pytest.approx(1.0)
    assert mean_iou(conf) == pytest.approx(0.75)


def test_confusion_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="differs"):
        confusion_matrix(np.zeros((2, 2), int), np.zeros((2, 3), int), 3)


def test_sweep_equals_direct_evaluation_at_every_threshold():
    rng = np.random.default_rng(0)
    n = 21
    thresholds = sweep_thresholds(0.05, 0.60, 0.05, extra=(0.14,))
    total_hist = np.zeros((n, n, len(thresholds) + 1), np.int64)
    direct = np.zeros((len(thresholds), n, n), np.int64)
    for i in range(6):
        h, w = 13 + i, 17
        k = i % 3  # includes an image with no positive class
        keys = np.sort(rng.choice(20, size=k, replace=False))
        high_res = rng.random((k, h, w)).astype(np.float16)
        high_res[:, 0, 0] = 0.25  # exact ties with a threshold
        gt = rng.integers(0, n, size=(h, w))
        gt[rng.random((h, w)) < 0.1] = 255
        total_hist += sweep_histogram(high_res, keys, gt, thresholds, n)
        for j, t in enumerate(thresholds):
            direct[j] += confusion_matrix(cam_to_label(high_res, keys, float(t)), gt, n)
            single = sweep_histogram(high_res, keys, gt, thresholds[j:j + 1], n)  # the one-threshold path
            assert (confusions_from_histogram(single)[0] ==
                    confusion_matrix(cam_to_label(high_res, keys, float(t)), gt, n)).all()
    assert (confusions_from_histogram(total_hist) == direct).all()


def test_sweep_picks_the_right_threshold_on_crafted_input():
    # foreground pixels score 0.5, background pixels 0.2: any threshold in [0.2, 0.5) is perfect
    gt = np.zeros((4, 4), int)
    gt[:2] = 3
    high_res = np.where(gt == 3, 0.5, 0.2)[None].astype(np.float32)
    thresholds = sweep_thresholds(0.05, 0.60, 0.05)
    confs = confusions_from_histogram(sweep_histogram(high_res, np.array([2]), gt, thresholds, 21))
    mious = np.array([mean_iou(c) for c in confs])
    best = thresholds[np.nanargmax(mious)]
    assert 0.2 <= best < 0.5 and mious.max() == pytest.approx(1.0)
    assert mious[thresholds.tolist().index(np.float32(0.1))] == pytest.approx(0.25)  # all foreground
    assert mious[-1] == pytest.approx(0.25)  # 0.60: all background


def test_sweep_thresholds_inclusive_and_sorted():
    t = sweep_thresholds(0.05, 0.60, 0.01, extra=(0.14, 0.13))
    assert len(t) == 56 and t[0] == np.float32(0.05) and t[-1] == np.float32(0.60)
    assert (np.diff(t) > 0).all()


def test_table_in_paper_order():
    iou = np.full(21, 0.5)
    iou[3] = np.nan
    table = format_table(iou, 0.5)
    head, _, row = table.strip().splitlines()
    assert head.split("|")[1].strip() == "bkg" and head.split("|")[-2].strip() == "mIoU"
    assert head.split("|")[12].strip() == "table" and head.split("|")[21].strip() == "tv"
    assert row.split("|")[4].strip() == "-" and row.split("|")[1].strip() == "50.0"


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_sweep_counts_exactly_with_ties_signed_zeros_and_many_channels(dtype):
    """The look-up paths (cell table, float-bits buckets, running argmax) count what the direct label
    maps count, in both stored precisions, for scores on and around the thresholds."""
    rng = np.random.default_rng(2)
    n = 21
    thresholds = sweep_thresholds(-0.2, 0.6, 0.02, extra=(0.0, 0.14))
    for k in (1, 3, 7):
        h, w = 23, 29
        keys = np.sort(rng.choice(20, size=k, replace=False))
        high_res = (rng.random((k, h, w)) * 1.2 - 0.3).astype(dtype)
        flat = high_res.reshape(-1)
        pick = rng.random(flat.shape) < 0.3  # exact ties with thresholds, and both zeros
        flat[pick] = rng.choice(np.concatenate([thresholds, [0.0, -0.0]]), pick.sum()).astype(dtype)
        high_res[-1, :5] = high_res[0, :5]  # equal channels: the first one wins, as argmax
        gt = rng.integers(0, n, size=(h, w)).astype(np.uint8)
        gt[rng.random((h, w)) < 0.1] = 255
        confs = confusions_from_histogram(sweep_histogram(high_res, keys, gt, thresholds, n))
        for j, t in enumerate(thresholds):
            assert (confs[j] == confusion_matrix(cam_to_label(high_res, keys, float(t)), gt, n)).all()
            single = sweep_histogram(high_res, keys, gt, thresholds[j:j + 1], n)
            assert (confusions_from_histogram(single)[0] == confs[j]).all()
