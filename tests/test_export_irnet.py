"""The IRNet export (`infer.legacy_dir`): files load the way IRNet's scripts load them."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vwe.formats.cams import CamRecord, export_legacy, read_cam, write_cam
from vwe.report.miou import cam_to_label


def _record(rng: np.random.Generator, keys: list[int], h: int, w: int, dtype=np.float32) -> CamRecord:
    k = len(keys)
    return CamRecord(np.array(keys, dtype=np.int64),
                     rng.random((k, -(-h // 4), -(-w // 4))).astype(dtype),
                     rng.random((k, h, w)).astype(dtype), "c0ffee")


@pytest.fixture()
def exported(tmp_path):
    rng = np.random.default_rng(0)
    cams = tmp_path / "cams"
    records = {"2007_000032": _record(rng, [0, 14], 37, 50), "2007_000039": _record(rng, [19], 64, 48, np.float16),
               "2007_000063": _record(rng, [], 21, 30)}
    for key, rec in records.items():
        write_cam(cams / f"{key}.npz", rec)
    n = export_legacy(cams, tmp_path / "irnet")
    assert n == 3
    return tmp_path / "irnet", {k: read_cam(cams / f"{k}.npz") for k in records}


def test_seed_format(exported):
    out, records = exported
    assert sorted(p.name for p in out.iterdir()) == ["2007_000032.npy", "2007_000039.npy", "2007_000063.npy"]
    for key, rec in records.items():
        item = np.load(out / f"{key}.npy", allow_pickle=True).item()
        assert set(item) == {"keys", "cam", "high_res"}
        assert isinstance(item["keys"], np.ndarray) and item["keys"].dtype == np.int64
        assert isinstance(item["cam"], torch.Tensor) and item["cam"].dtype == torch.float32
        assert isinstance(item["high_res"], np.ndarray) and item["high_res"].dtype == np.float32
        h, w = rec.high_res.shape[1:]
        assert tuple(item["cam"].shape) == (len(rec.keys), -(-h // 4), -(-w // 4))
        np.testing.assert_array_equal(item["keys"], rec.keys)
        np.testing.assert_array_equal(item["cam"].numpy(), rec.cam.astype(np.float32))
        np.testing.assert_array_equal(item["high_res"], rec.high_res.astype(np.float32))


def test_irnet_label_steps_read_it(exported):
    """What IRNet's cam_to_ir_label / eval_cam (high_res, numpy) and make_sem_seg_labels (cam, torch,
    `.cuda()`, upsampled x4 and cropped) do with a file."""
    out, records = exported
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for key, rec in records.items():
        cam_dict = np.load(out / f"{key}.npy", allow_pickle=True).item()
        keys = np.pad(cam_dict["keys"] + 1, (1, 0), mode="constant")
        assert keys.tolist() == [0, *(rec.keys + 1).tolist()]
        # cam_to_ir_label.py / eval_cam.py: background channel padded in front of high_res, argmax, keys[...]
        cams = np.pad(cam_dict["high_res"], ((1, 0), (0, 0), (0, 0)), mode="constant", constant_values=0.3)
        np.testing.assert_array_equal(keys[np.argmax(cams, axis=0)], cam_to_label(rec.high_res, rec.keys, 0.3))
        # make_sem_seg_labels.py: the strided cam goes to the GPU as a tensor
        cam = cam_dict["cam"].cuda() if device == "cuda" else cam_dict["cam"].to(device)
        h, w = rec.high_res.shape[1:]
        if not len(rec.keys):  # no positive class: nothing for IRNet to propagate (every VOC image has one)
            assert tuple(cam.shape) == (0, -(-h // 4), -(-w // 4))
            continue
        up = F.interpolate(cam.unsqueeze(0), scale_factor=4, mode="bilinear", align_corners=False)[0, :, :h, :w]
        assert up.shape == (len(rec.keys), h, w)
        up = F.pad(up / up.max(), (0, 0, 0, 0, 1, 0), value=0.25)
        pred = keys[torch.argmax(up, dim=0).cpu().numpy()]
        assert pred.shape == (h, w) and set(np.unique(pred)) <= set(keys.tolist())
