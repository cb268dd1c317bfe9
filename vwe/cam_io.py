"""CAM files: one `<id>.npz` per image with `keys`, `cam`, `high_res` and the producing checkpoint's hash.

NumPy .npz without pickle; written atomically so an interrupted inference never leaves a file that
looks complete. `export_legacy` writes the older pickled-dict `.npy` files that IRNet-style refinement
tools read (with `cam` a torch tensor, as they expect).
"""
from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vwe.errors import DataError
from vwe.io import atomic_write

FIELDS = ("keys", "cam", "high_res", "checkpoint")


@dataclass
class CamRecord:
    keys: np.ndarray        # (k,) int64 class indices 0..C-1 of the image's positive classes
    cam: np.ndarray         # (k, ceil(H/4), ceil(W/4))
    high_res: np.ndarray    # (k, H, W)
    checkpoint: str         # hash of the weights that produced it


def write_cam(path: Path, record: CamRecord) -> None:
    """Write atomically: a temporary file in the same folder, then rename."""
    atomic_write(path, lambda f: np.savez(f, keys=np.asarray(record.keys, dtype=np.int64), cam=record.cam,
                                          high_res=record.high_res, checkpoint=np.array(record.checkpoint)),
                 "CAM file")


def read_cam(path: Path, num_classes: int = 20) -> CamRecord:
    """Read and check one CAM file; DataError naming the file when it is corrupt or inconsistent."""
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [f for f in FIELDS if f not in z.files]
            if missing:
                raise DataError(f"CAM file {path}: missing array(s) {', '.join(missing)}")
            rec = CamRecord(z["keys"], z["cam"], z["high_res"], str(z["checkpoint"]))
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"CAM file {path}: not found") from None
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise DataError(f"CAM file {path}: unreadable ({e})") from None
    k = len(rec.keys)
    if rec.keys.ndim != 1 or rec.cam.ndim != 3 or rec.high_res.ndim != 3 or \
            rec.cam.shape[0] != k or rec.high_res.shape[0] != k:
        raise DataError(f"CAM file {path}: inconsistent shapes keys {rec.keys.shape}, cam {rec.cam.shape}, "
                        f"high_res {rec.high_res.shape}")
    if k and (rec.keys.min() < 0 or rec.keys.max() >= num_classes):
        raise DataError(f"CAM file {path}: class index out of range 0..{num_classes - 1}: {rec.keys.tolist()}")
    h, w = rec.high_res.shape[1:]
    if rec.cam.shape[1:] != (-(-h // 4), -(-w // 4)):
        raise DataError(f"CAM file {path}: strided cam {rec.cam.shape[1:]} does not match high_res {(h, w)} / 4")
    return rec


def legacy_item(rec: CamRecord) -> dict:
    """The seed/IRNet per-image dict: `keys` NumPy int64, `cam` a torch float32 tensor (IRNet's label step
    calls `.cuda()` on it), `high_res` NumPy float32."""
    return {"keys": np.asarray(rec.keys, dtype=np.int64),
            "cam": torch.from_numpy(np.ascontiguousarray(rec.cam, dtype=np.float32)),
            "high_res": np.ascontiguousarray(rec.high_res, dtype=np.float32)}


def export_legacy(cam_dir: Path, out_dir: Path) -> int:
    """Write `<id>.npy` pickled dicts (see `legacy_item`) for IRNet-style tools; returns the count."""
    out_dir.mkdir(parents=True, exist_ok=True)
    n = 0
    for path in sorted(cam_dir.glob("*.npz")):
        item = legacy_item(read_cam(path))
        atomic_write(out_dir / f"{path.stem}.npy", lambda f: np.save(f, item, allow_pickle=True), "CAM export")
        n += 1
    return n


def cam_dir_for(cfg) -> Path:
    """Where a run's CAMs live: `infer.out_dir`, or `<run_dir>/cams`."""
    return Path(cfg.infer.out_dir) if cfg.infer.out_dir else Path(cfg.output.run_dir) / "cams"
