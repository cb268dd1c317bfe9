"""CAM files: one `<id>.npz` per image with `keys`, `cam`, `high_res` and the producing weights' SHA-256.

NumPy .npz without pickle; written atomically so an interrupted inference never leaves a file that
looks complete. `export_legacy` writes the older pickled-dict `.npy` files that IRNet-style refinement
tools read (with `cam` a torch tensor, as they expect).
"""
from __future__ import annotations

import zipfile
from collections.abc import Callable
from typing import BinaryIO
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vwe.runtime.errors import DataError, id_listing
from vwe.runtime.files import atomic_write

FIELDS = ("keys", "cam", "high_res")
HASH_FIELD = "weights_sha256"
OLD_HASH_FIELD = "checkpoint"  # files written before the rename


@dataclass
class CamRecord:
    keys: np.ndarray        # (k,) int64 class indices 0..C-1 of the image's positive classes
    cam: np.ndarray | None  # (k, ceil(H/4), ceil(W/4)); None when read with strided=False
    high_res: np.ndarray    # (k, H, W)
    weights_sha256: str     # SHA-256 of the weights file that produced it


def cam_writer(record: CamRecord) -> Callable[[BinaryIO], None]:
    """Writes the record's .npz to an open binary file (what atomic_write takes)."""
    return lambda f: np.savez(f, keys=np.asarray(record.keys, dtype=np.int64), cam=record.cam,
                              high_res=record.high_res, **{HASH_FIELD: np.array(record.weights_sha256)})


def write_cam(path: Path, record: CamRecord) -> None:
    """Write atomically (vwe.runtime.files.atomic_write)."""
    atomic_write(path, cam_writer(record), "CAM file")


def read_cam(path: Path, num_classes: int = 20, strided: bool = True) -> CamRecord:
    """Read and check one CAM file; DataError naming the file when it is corrupt or inconsistent:
    unreadable, missing arrays, shapes that disagree, class indices outside 0..num_classes-1 or repeated,
    non-finite scores. strided=False neither reads nor checks the strided `cam` (record.cam is None): for
    readers of high_res alone (evaluation, CAM labels)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            hash_field = HASH_FIELD if HASH_FIELD in z.files else OLD_HASH_FIELD
            missing = [f for f in (*FIELDS, hash_field) if f not in z.files]
            if missing:
                raise DataError(f"CAM file {path}: missing array(s) {', '.join(missing)}")
            rec = CamRecord(z["keys"], z["cam"] if strided else None, z["high_res"], str(z[hash_field]))
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"CAM file {path}: not found") from None
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise DataError(f"CAM file {path}: unreadable ({e})") from None
    if rec.keys.dtype.kind not in "iu":
        raise DataError(f"CAM file {path}: keys must be integer class indices, got {rec.keys.dtype}")
    named = [("cam", rec.cam)] * strided + [("high_res", rec.high_res)]
    for name, values in named:
        if values.dtype.kind != "f":
            raise DataError(f"CAM file {path}: '{name}' must hold floating-point scores, got "
                            f"{values.dtype}")
    if rec.keys.ndim != 1 or any(v.ndim != 3 or v.shape[0] != len(rec.keys) for _, v in named):
        raise DataError(f"CAM file {path}: inconsistent shapes keys {rec.keys.shape}, "
                        + ", ".join(f"{name} {v.shape}" for name, v in named))
    k = len(rec.keys)
    if k and (rec.keys.min() < 0 or rec.keys.max() >= num_classes):
        raise DataError(f"CAM file {path}: class index out of range 0..{num_classes - 1}: {rec.keys.tolist()}")
    if len(np.unique(rec.keys)) != k:
        raise DataError(f"CAM file {path}: a class index appears twice in keys {rec.keys.tolist()}")
    h, w = rec.high_res.shape[1:]
    if strided and rec.cam.shape[1:] != (-(-h // 4), -(-w // 4)):
        raise DataError(f"CAM file {path}: strided cam {rec.cam.shape[1:]} does not match high_res {(h, w)} / 4")
    for name, values in named:
        if not np.isfinite(values).all():
            bad = np.argwhere(~np.isfinite(values))
            c, y, x = bad[0]
            raise DataError(f"CAM file {path}: {len(bad)} non-finite value(s) in '{name}', the first "
                            f"{values[c, y, x]} for class {int(rec.keys[c])} at (y={y}, x={x})")
    return rec


def read_cam_for(path: Path, size: tuple[int, int], against: str = "image", num_classes: int = 20,
                 strided: bool = True) -> CamRecord:
    """read_cam, with the CAM's size checked against its image's (or mask's); DataError naming the file."""
    rec = read_cam(path, num_classes, strided)
    if rec.high_res.shape[1:] != tuple(size):
        raise DataError(f"CAM file {path}: size {rec.high_res.shape[1:]} differs from its {against} {tuple(size)}")
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


def cams_by_weights(parts: list[dict[str, list[str]]], cam_dir: Path, advice: str) -> dict[str, list[str]]:
    """Every rank's CAM ids grouped by the SHA-256 of the weights that computed them; a DataError (with
    `advice`) when they come from more than one weights file."""
    merged: dict[str, list[str]] = {}
    for part in parts:
        for sha, ids in part.items():
            merged.setdefault(sha, []).extend(ids)
    if len(merged) > 1:
        lines = [f"weights {sha}: {len(ids)} CAMs, e.g. {id_listing(ids, 5)}" for sha, ids in merged.items()]
        raise DataError(f"CAMs in {cam_dir} come from {len(merged)} different weights files: {advice}:\n  "
                        + "\n  ".join(lines))
    return merged
