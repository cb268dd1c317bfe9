"""Training checkpoints on disk (Accelerate state + meta.json) and the exported final weights.

Layout of a run directory:
    checkpoints/step-000200/   Accelerate state (model.safetensors, optimizer, RNG) + meta.json
    checkpoints/.tmp-step-000250/   a save in progress: never picked up by resume
    checkpoints/corrupt-step-000150/   failed verification on resume (moved aside, kept for inspection)
    checkpoints/diverged-step-000100/  produced a non-finite loss (moved aside)
    final/model.safetensors    weights + the resolved config in the file's metadata (for `vwe infer`)

A checkpoint is complete when its folder has its final name; the rename happens only after every rank
has written its part and the files are fsync'ed, so neither a killed process nor a node crash leaves a
checkpoint that looks complete. meta.json records the SHA-256 of every file; every load of a checkpoint
folder (resume, `vwe infer` on a checkpoint's weights) verifies them all before anything is read
(Accelerate and DeepSpeed unpickle optimizer and RNG state), so only files this run wrote are ever
unpickled. meta.json also records the training state (`progress`, `schedule`), the config, and a digest of
the data trained on (the training split's shard SHA-256s). Folders are named by optimizer step ourselves:
Accelerate's automatic naming keeps a counter that load_state does not restore.

When to save, which checkpoint to resume from, and what a resume may change: vwe/training/checkpointer.py.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from vwe.runtime.errors import CheckpointError, WriteError
from vwe.runtime.files import (atomic_write, commit_dir, file_sha256, free_bytes, mount_point, no_space,
                               writing)

STEP_DIR = re.compile(r"^step-(\d{6,})$")
META = "meta.json"
WEIGHTS_FILE = "model.safetensors"  # in <run_dir>/final/ and in each training checkpoint folder
# Model settings that change the shapes or names of the weights: a checkpoint must agree on them.
SHAPE_KEYS = ("backbone", "num_classes", "num_words", "codebook", "norm")
FINAL_WEIGHTS_NAME = Path("final") / WEIGHTS_FILE
MB = 1 << 20


def checkpoint_root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def step_folder(run_dir: Path, step: int) -> Path:
    """The folder of the checkpoint taken after `step` optimizer steps."""
    return checkpoint_root(run_dir) / f"step-{step:06d}"


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := STEP_DIR.match(p.name)) and (p / META).is_file()]
    return [p for _, p in sorted(found)]


def data_digest(shard_sha256s: Iterable[str]) -> str:
    """One SHA-256 for the data a run trains on: over its split's shard SHA-256s, in index order."""
    return hashlib.sha256("\n".join(shard_sha256s).encode()).hexdigest()


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def check_space(folder: Path, needed: int) -> None:
    """WriteError naming the device when less than `needed` bytes are free where `folder` goes."""
    free = free_bytes(folder)
    if free < needed:
        raise space_error(folder, needed, free)


def space_error(folder: Path, needed: int, free: int) -> WriteError:
    return WriteError(f"cannot write checkpoint {folder}: no space left on the device {mount_point(folder)} "
                      f"(needs about {-(-needed // MB)} MB, {free // MB} MB free); the previous checkpoints "
                      f"are intact: free space, or lower train.keep_checkpoints, and run again to resume")


def write_checkpoint(folder: Path, write_state: Callable[[Path], None], meta: dict, needed: int,
                     main: bool, collective: Callable) -> Path:
    """Write a checkpoint into `folder` (checkpoints/step-N): every rank's `write_state(tmp)` into a temporary
    folder, then rank 0 records the SHA-256 of every file in meta.json (written last), fsyncs and renames.

    `needed` is the checkpoint's expected size: refused before anything is written when the device has less
    free, and named in the message when the device fills up during the write. `collective(fn, main_only)`
    runs `fn` on every rank (or rank 0) and raises any rank's error on all of them.
    """
    tmp = folder.with_name(f".tmp-{folder.name}")

    def prepare() -> None:
        with writing(tmp, "checkpoint"):
            shutil.rmtree(tmp, ignore_errors=True)
            folder.parent.mkdir(parents=True, exist_ok=True)
            check_space(tmp, needed)
            tmp.mkdir()

    def state() -> None:
        try:
            with writing(tmp, "checkpoint"):
                write_state(tmp)
        except Exception as e:
            if no_space(e) or free_bytes(tmp) < MB:  # torch.save says only "file write failed"
                raise space_error(tmp, needed, free_bytes(tmp) + _bytes_or_zero(tmp)) from e
            raise

    def commit() -> None:
        files = {str(p.relative_to(tmp)): file_sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        try:
            atomic_write(tmp / META, json.dumps({**meta, "files": files}, indent=2), "checkpoint metadata")
        except WriteError as e:
            if no_space(e):
                raise space_error(tmp, needed, free_bytes(tmp) + _bytes_or_zero(tmp)) from e
            raise
        commit_dir(tmp, folder, "checkpoint")

    collective(prepare, main_only=True)
    try:
        collective(state)
        collective(commit, main_only=True)
    except BaseException:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _bytes_or_zero(path: Path) -> int:
    try:
        return folder_bytes(path)
    except OSError:
        return 0


def verify_checkpoint(path: Path) -> str | None:
    """None when every file of the checkpoint has the SHA-256 recorded at save time, else the problem."""
    try:
        meta = json.loads((path / META).read_text())
    except FileNotFoundError:
        return f"{path / META} is missing"
    except (ValueError, UnicodeDecodeError) as e:
        return f"{path / META} is corrupt ({e})"
    except OSError as e:
        return f"{path / META} cannot be read ({e.strerror})"
    files = meta.get("files") if isinstance(meta, dict) else None
    if not isinstance(files, dict):
        return f"{path / META} records no checksums (written by an older vwe): it cannot be verified"
    for rel, digest in files.items():
        p = path / rel
        if not p.is_file() or not p.resolve().is_relative_to(path.resolve()):
            return f"{p} is missing"
        if file_sha256(p) != digest:
            return f"{p} does not match the SHA-256 recorded when it was saved (truncated or modified)"
    extra = sorted(str(p.relative_to(path)) for p in path.rglob("*")
                   if p.is_file() and p.name != META and str(p.relative_to(path)) not in files)
    if extra:
        return f"{path / extra[0]} was not part of the checkpoint as saved"
    return None


def verified_meta(path: Path, what: str = "checkpoint") -> dict:
    """meta.json of a checkpoint folder whose files all match their recorded SHA-256; CheckpointError else."""
    problem = verify_checkpoint(path)
    if problem:
        raise CheckpointError(f"{what} {path} failed verification: {problem}")
    return read_meta(path)


def move_aside(path: Path, prefix: str) -> Path:
    """Rename a checkpoint folder so resume never picks it again; returns the new path."""
    target = path.with_name(f"{prefix}-{path.name}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{prefix}{n}-{path.name}")
    os.replace(path, target)
    return target


def first_nonfinite(tensors: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """Name of the first floating-point tensor holding NaN or Inf (parameters, BN statistics, codebook)."""
    for name, t in tensors:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


def read_meta(path: Path) -> dict:
    try:
        meta = json.loads((path / META).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is not a complete checkpoint (no {META}); "
                              f"complete ones are named step-NNNNNN under checkpoints/") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path / META}: corrupt ({e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("progress"), dict):
        raise CheckpointError(f"{path / META}: not a vwe checkpoint record (no training progress)")
    return meta


def check_compatible(meta: dict, model_cfg: dict, path: Path) -> None:
    """Refuse a checkpoint whose model settings give other weight shapes than this config."""
    saved = meta.get("config", {}).get("model", {})
    diffs = [f"model.{k}: checkpoint {saved.get(k)!r}, config {model_cfg.get(k)!r}"
             for k in SHAPE_KEYS if saved.get(k) != model_cfg.get(k)]
    if diffs:
        raise CheckpointError(f"checkpoint {path} was made for another model shape:\n  " + "\n  ".join(diffs))


def export_weights(state_dict: dict[str, torch.Tensor], config: dict, path: Path) -> str:
    """Write final weights as one safetensors file with the resolved config; returns its SHA-256.
    An existing file holding the same tensors is kept (its SHA-256 is what CAMs made from it record)."""
    from safetensors.torch import save
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    bad = first_nonfinite(tensors.items())
    if bad is not None:
        raise CheckpointError(f"refusing to export {path}: tensor {bad} holds NaN or Inf")
    if _same_tensors(path, tensors):
        return file_sha256(path)  # same weights (a rerun of a finished run): keep the file and its SHA-256
    data = save(tensors, metadata={"vwe_config": json.dumps(config)})
    atomic_write(path, data, "weights")
    return hashlib.sha256(data).hexdigest()


def _same_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> bool:
    from safetensors.torch import load_file
    if not path.is_file():
        return False
    try:
        old = load_file(str(path))
    except Exception:  # unreadable: rewrite it
        return False
    return old.keys() == tensors.keys() and all(
        old[k].dtype == t.dtype and old[k].shape == t.shape and torch.equal(old[k], t) for k, t in tensors.items())


def stage_weights(given: str, default: Path, key: str, train_command: str) -> Path:
    """A later stage's weights file: `given` (a file, or a folder holding model.safetensors: a checkpoint or
    final/), else `default`; CheckpointError naming the key and the command that makes them."""
    path = Path(given) if given else default
    if path.is_dir():
        path = path / FINAL_WEIGHTS_NAME.name
    if not path.is_file():
        raise CheckpointError(f"{key}: weights {path} not found: train first (`{train_command}`), or set {key} to a "
                              f"weights file or a checkpoint folder")
    return path


def load_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read exported weights (no pickle) and the config stored with them. Weights inside a training
    checkpoint folder are read only after the whole folder verifies against its meta.json."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    if not path.is_file():
        raise CheckpointError(f"weights file {path} not found (train first, or set infer.weights)")
    if (path.parent / META).is_file():
        verified_meta(path.parent)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"weights file {path}: unreadable ({e})") from None
    config = json.loads(meta["vwe_config"]) if "vwe_config" in meta else {}
    return state, config
