"""`vwe demo` (the README's first command): synthetic data -> shards -> 2-process train -> infer ->
evaluate -> refine -> label split -> DeepLab -> its val mIoU -> IRNet's relation labels, relation network
and random-walk labels -> pictures. The CAMs it learns are far
better than predicting background everywhere, and the DeepLab trained on their CRF labels scores above
the CAMs themselves on the same val images (measured: 78.2 against 65.3 mIoU)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import run_vwe


def all_background_miou(confusion: np.ndarray) -> float:
    """mIoU of predicting background for every pixel, from the ground-truth counts of a confusion matrix."""
    gt = confusion.sum(axis=1)
    present = gt > 0
    iou = np.zeros(len(gt))
    iou[0] = gt[0] / gt.sum()
    return float(iou[present].mean())


@pytest.mark.multiprocess
def test_demo_learns_well_above_all_background(tmp_path):
    proc = run_vwe("demo", "--workdir", str(tmp_path), "--processes", "2", timeout=900)
    run = tmp_path / "run"
    report = json.loads((run / "eval" / "report.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["replicas_identical"]
    baseline = all_background_miou(np.array(report["confusion"]))
    assert report["miou"] > 0.35 and report["miou"] > 2.5 * baseline, (report["miou"], baseline)
    assert report["num_images"] == 320 and report["split"] == "train" and not report["missing"]
    assert "sweep" in report and "| bkg | aero |" in proc.stdout and str(run / "eval" / "report.json") in proc.stdout
    labels = json.loads((run / "pseudo_labels" / "report.json").read_text())
    seg = json.loads((run / "seg" / "eval" / "val" / "report.json").read_text())
    cam_val = json.loads((tmp_path / "cam_val" / "eval" / "report.json").read_text())
    assert labels["miou"] > report["miou"]  # the CRF improves on the CAMs it refines (77.1 against 64.4)
    # DeepLab trained on the pseudo labels beats the CAMs on val: 78.2 against 65.3 when measured in bf16,
    # 77.6 in fp32 (a CPU without native bf16); training seeds 1-3 gave 69.8-73.3 (configs/demo.yaml)
    assert seg["scored"] == cam_val["num_images"] == 48 and seg["miou"] > cam_val["miou"] + 0.02, \
        (seg["miou"], cam_val["miou"])
    assert "| DeepLab on the pseudo labels | val |" in proc.stdout
    # IRNet's labels from the same CAMs, scored on the same 320 masks (measured 57.6: docs/irnet.md says why
    # a random frozen backbone on 128 px images lowers them), well above all-background
    walk = json.loads((run / "irn" / "pseudo_labels" / "report.json").read_text())
    irn = json.loads((run / "irn" / "summary.json").read_text())
    assert irn["processes"] == 2 and irn["replicas_identical"] and walk["settings"]["exp_times"] == 4
    assert walk["num_images"] == walk["scored"] == 320 and walk["miou"] > 2 * baseline, (walk["miou"], baseline)
    assert "| IRNet pseudo labels (random walk) | train |" in proc.stdout
    pictures = sorted((run / "eval" / "pictures").glob("*.png"))
    assert len(pictures) == 3 and all(p.stat().st_size > 1000 for p in pictures)
