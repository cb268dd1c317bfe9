"""Training checkpoints (Accelerate state + our counters) and the exported final weights.

Layout of a run directory:
    checkpoints/step-000200/   Accelerate state (model.safetensors, optimizer, RNG) + meta.json
    checkpoints/.tmp-step-000250/   a save in progress: never picked up by resume
    final/model.safetensors    weights + the resolved config in the file's metadata (for `vwe infer`)

A checkpoint is complete when its folder has its final name; the rename happens only after every rank
has written its part, so a crash during a save never leaves a checkpoint that looks complete. Folders
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
from typing import Any

import torch

from vwe.io import atomic_write, commit_dir, file_sha256
from vwe.errors import CheckpointError

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
    """Save Accelerate state and `meta` into checkpoints/step-N atomically; keep the newest `keep`."""
    root = checkpoint_root(run_dir)
    final = root / f"step-{meta['progress']['step']:06d}"
    tmp = root / f".tmp-{final.name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / META).write_text(json.dumps(meta, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in complete_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def quarantine_diverged(run_dir: Path, bad_step: int) -> Path | None:
    """A non-finite loss at `bad_step` was computed with the weights saved at `bad_step - 1`: rename that
    checkpoint so resume never picks it. Returns the newest checkpoint left (the last good one) or None."""
    suspect = checkpoint_root(run_dir) / f"step-{bad_step - 1:06d}"
    if suspect.is_dir():
        os.replace(suspect, suspect.with_name(f"diverged-{suspect.name}"))
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


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


def resolve_resume(resume: str, run_dir: Path) -> Path | None:
    """`auto`: newest complete checkpoint of the run (or None); `none`: None; else that folder."""
    if resume == "none":
        return None
    if resume == "auto":
        found = complete_checkpoints(run_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointError(f"train.resume: checkpoint folder {path} does not exist")
    read_meta(path)
    return path


def export_weights(state_dict: dict[str, torch.Tensor], config: dict, path: Path) -> str:
    """Write final weights as one safetensors file with the resolved config; returns its SHA-256."""
    from safetensors.torch import save
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    data = save(tensors, metadata={"vwe_config": json.dumps(config)})
    atomic_write(path, data, "weights")
    return hashlib.sha256(data).hexdigest()


def load_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read exported weights (no pickle) and the config stored with them."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    if not path.is_file():
        raise CheckpointError(f"weights file {path} not found (train first, or set infer.checkpoint)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"weights file {path}: unreadable ({e})") from None
    config = json.loads(meta["vwe_config"]) if "vwe_config" in meta else {}
    return state, config
