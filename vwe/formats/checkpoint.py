"""Training checkpoints (Accelerate state + our counters) and the exported final weights.

Layout of a run directory:
    checkpoints/step-000200/   Accelerate state (model.safetensors, optimizer, RNG) + meta.json
    checkpoints/.tmp-step-000250/   a save in progress: never picked up by resume
    checkpoints/corrupt-step-000150/   failed verification on resume (moved aside, kept for inspection)
    checkpoints/diverged-step-000100/  produced a non-finite loss (moved aside)
    final/model.safetensors    weights + the resolved config in the file's metadata (for `vwe infer`)

A checkpoint is complete when its folder has its final name; the rename happens only after every rank
has written its part and the files are fsync'ed, so neither a killed process nor a node crash leaves a
checkpoint that looks complete. meta.json records the SHA-256 of every file; resume verifies them all
before anything is loaded (Accelerate and DeepSpeed unpickle optimizer and RNG state), so only files
this run wrote are ever unpickled. Folders
are named by optimizer step ourselves: Accelerate's automatic naming keeps a counter that load_state
does not restore.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from collections.abc import Iterable
from typing import Any

import torch

from vwe.runtime.dist import collective_call
from vwe.runtime.errors import CheckpointError
from vwe.runtime.files import atomic_write, commit_dir, file_sha256, writing

STEP_DIR = re.compile(r"^step-(\d{6,})$")
META = "meta.json"
# Model settings that change the shapes or names of the weights: a checkpoint must agree on them.
SHAPE_KEYS = ("backbone", "num_classes", "num_words", "codebook", "norm")
FINAL_WEIGHTS_NAME = Path("final") / "model.safetensors"


def checkpoint_root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := STEP_DIR.match(p.name)) and (p / META).is_file()]
    return [p for _, p in sorted(found)]


def save_checkpoint(accelerator, run_dir: Path, meta: dict, keep: int) -> Path:
    """Save Accelerate state and `meta` into checkpoints/step-N; keep the newest `keep`.

    Every rank writes its part into a temporary folder; rank 0 then records the SHA-256 of every file in
    meta.json (written last), fsyncs the files and the folder, and renames it to its final name.
    """
    root = checkpoint_root(run_dir)
    final = root / f"step-{meta['progress']['step']:06d}"
    tmp = root / f".tmp-{final.name}"

    def prepare() -> None:
        with writing(tmp, "checkpoint"):
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)

    def write_state() -> None:
        with writing(tmp, "checkpoint"):
            accelerator.save_state(str(tmp), safe_serialization=True)

    def commit() -> None:
        files = {str(p.relative_to(tmp)): file_sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        atomic_write(tmp / META, json.dumps({**meta, "files": files}, indent=2), "checkpoint metadata")
        commit_dir(tmp, final, "checkpoint")
        for old in complete_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)

    collective_call(prepare, main_only=True)
    try:
        collective_call(write_state)
        collective_call(commit, main_only=True)
    except BaseException:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def verify_checkpoint(path: Path) -> str | None:
    """None when every file of the checkpoint has the SHA-256 recorded at save time, else the problem."""
    try:
        meta = json.loads((path / META).read_text())
    except FileNotFoundError:
        return f"{path / META} is missing"
    except (ValueError, UnicodeDecodeError) as e:
        return f"{path / META} is corrupt ({e})"
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


def move_aside(path: Path, prefix: str) -> Path:
    """Rename a checkpoint folder so resume never picks it again; returns the new path."""
    target = path.with_name(f"{prefix}-{path.name}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{prefix}{n}-{path.name}")
    os.replace(path, target)
    return target


def select_checkpoint(resume: str, run_dir: Path) -> tuple[Path | None, list[str]]:
    """The verified checkpoint to resume from (or None) and warnings about checkpoints moved aside.

    `auto`: the newest complete checkpoint that verifies; each one that does not is renamed to
    `corrupt-step-N` and the previous one is tried. `none`: None. A path: that checkpoint, verified.
    """
    if resume == "none":
        return None, []
    if resume != "auto":
        path = Path(resume)
        if not path.is_dir():
            raise CheckpointError(f"train.resume: checkpoint folder {path} does not exist")
        problem = verify_checkpoint(path)
        if problem:
            raise CheckpointError(f"train.resume: checkpoint {path} failed verification: {problem}")
        return path, []
    warnings: list[str] = []
    candidates = complete_checkpoints(run_dir)
    for path in reversed(candidates):
        problem = verify_checkpoint(path)
        if problem is None:
            return path, warnings
        aside = move_aside(path, "corrupt")
        warnings.append(f"warning: checkpoint {path} failed verification ({problem}); moved to {aside}")
    if candidates:
        raise CheckpointError("no intact checkpoint left to resume from:\n  " + "\n  ".join(warnings) +
                              "\nstart over with train.resume=none, or use a new output.run_dir")
    return None, warnings


def quarantine_diverged(run_dir: Path, bad_step: int) -> Path | None:
    """A non-finite loss at `bad_step` was computed with the weights saved at `bad_step - 1`: rename that
    checkpoint so resume never picks it. Returns the newest checkpoint left (the last good one) or None."""
    suspect = checkpoint_root(run_dir) / f"step-{bad_step - 1:06d}"
    if suspect.is_dir():
        move_aside(suspect, "diverged")
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def first_nonfinite(tensors: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """Name of the first floating-point tensor holding NaN or Inf (parameters, BN statistics, codebook)."""
    for name, t in tensors:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


def read_meta(path: Path) -> dict:
    try:
        return json.loads((path / META).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is not a complete checkpoint (no {META}); "
                              f"complete ones are named step-NNNNNN under checkpoints/") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path / META}: corrupt ({e})") from None


def check_compatible(meta: dict, model_cfg: dict, path: Path) -> None:
    """Refuse a checkpoint whose model settings give other weight shapes than this config."""
    saved = meta.get("config", {}).get("model", {})
    diffs = [f"model.{k}: checkpoint {saved.get(k)!r}, config {model_cfg.get(k)!r}"
             for k in SHAPE_KEYS if saved.get(k) != model_cfg.get(k)]
    if diffs:
        raise CheckpointError(f"checkpoint {path} was made for another model shape:\n  " + "\n  ".join(diffs))


def load_checkpoint(accelerator, path: Path, model_cfg: dict) -> dict:
    """Restore Accelerate state from a complete checkpoint after checking it fits this model."""
    meta = read_meta(path)
    check_compatible(meta, model_cfg, path)
    try:
        accelerator.load_state(str(path))
    except (RuntimeError, KeyError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} does not fit this model/optimizer: {e}") from None
    return meta


def export_weights(state_dict: dict[str, torch.Tensor], config: dict, path: Path) -> str:
    """Write final weights as one safetensors file with the resolved config; returns its SHA-256.
    An existing file holding the same tensors is kept (its hash is what CAMs made from it record)."""
    from safetensors.torch import save
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    bad = first_nonfinite(tensors.items())
    if bad is not None:
        raise CheckpointError(f"refusing to export {path}: tensor {bad} holds NaN or Inf")
    if _same_tensors(path, tensors):
        return file_sha256(path)  # same weights (a rerun of a finished run): keep the file and its hash
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


def load_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read exported weights (no pickle) and the config stored with them."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    if not path.is_file():
        raise CheckpointError(f"weights file {path} not found (train first, or set infer.weights)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"weights file {path}: unreadable ({e})") from None
    config = json.loads(meta["vwe_config"]) if "vwe_config" in meta else {}
    return state, config
