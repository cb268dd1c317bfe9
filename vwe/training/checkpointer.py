"""The checkpoint manager: when a run saves, what it may save, which checkpoint it resumes from, and
what a resume may change. The on-disk format and its verification are vwe/formats/checkpoint.py.

- Verification and fallback: resume takes the newest checkpoint whose files all match their recorded
  SHA-256; each one that does not is moved aside (`corrupt-step-N`) with a warning and the previous one
  is tried. An explicit `train.resume` folder must verify, or the run stops.
- Drift refusal: a config that would change the result (vwe/training/drift.py), or other training data
  (the digest of the split's shard SHA-256s recorded in the checkpoint, whatever data.root says), is
  refused unless `train.resume_changed: allow` (recorded in the run). A checkpoint of another model shape
  is always refused.
- Restore: every stateful piece through its own load_state_dict: model, optimizer and RNG (Accelerate's
  load_state), the lr schedule (PolySchedule) and the counters with the loader position (TrainState).
- Saving: every `train.checkpoint_every` steps, on preemption and at the end; nothing non-finite is ever
  saved; the free space is checked against the checkpoint's size before writing; the newest
  `train.keep_checkpoints` are kept; a non-finite loss moves aside the checkpoint whose weights made it.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from accelerate.utils import DistributedType

from vwe.formats.checkpoint import (FINAL_WEIGHTS_NAME, MB, check_compatible, complete_checkpoints, data_digest,
                                    export_weights, first_nonfinite, folder_bytes, move_aside, read_meta,
                                    step_folder, verify_checkpoint, write_checkpoint)
from vwe.formats.config import Config
from vwe.runtime.dist import collective_call, gather_objects
from vwe.runtime.errors import CheckpointError, ConfigDrift, NonFinite
from vwe.training.drift import Change, config_changes
from vwe.training.recipe import Recipe
from vwe.training.setup import Parts, TrainState


@dataclasses.dataclass(frozen=True)
class DataRecord:
    """What a run trains on, recorded in every checkpoint and compared on resume."""
    split: str
    root: str        # resolved (a local folder's absolute path), for the record only
    shards: int
    digest: str      # data_digest of the split's shard SHA-256s

    @classmethod
    def of(cls, cfg: Config, shard_sha256s: list[str], root: str) -> "DataRecord":
        return cls(cfg.data.train_split, root, len(shard_sha256s), data_digest(shard_sha256s))

    def describe(self) -> str:
        return f"{self.shards} shard(s) of split {self.split}, digest {self.digest[:16]}"


def training_data(cfg: Config) -> DataRecord:
    """The training split's record; with data.verify_shards, every local shard is checked against its
    index first (cached per process, so the loader does not hash them again)."""
    from vwe.data.loader import load_index, verify_shards
    index = load_index(cfg.data.root, cfg.data.train_split)
    if cfg.data.verify_shards:
        verify_shards(index)
    root = index.root if isinstance(index.root, str) else str(Path(index.root).resolve())
    return DataRecord.of(cfg, [s.sha256 for s in index.shards], root)


@dataclasses.dataclass
class Resumed:
    """A checkpoint chosen and checked for this config."""
    path: Path
    meta: dict
    notes: list[str]        # printed: moved-aside checkpoints, neutral config changes, layout changes
    changes: list[dict]     # result-changing config changes allowed by train.resume_changed (recorded)


def explicit_checkpoint(resume: str) -> Path:
    """The folder `train.resume` names, or CheckpointError saying what it is instead."""
    path = Path(resume)
    try:
        if path.is_file():
            raise CheckpointError(f"train.resume: {path} is a file, not a checkpoint folder (give a folder "
                                  f"<run_dir>/checkpoints/step-NNNNNN, or auto, or none)")
        if not path.is_dir():
            raise CheckpointError(f"train.resume: checkpoint folder {path} does not exist")
    except OSError as e:
        raise CheckpointError(f"train.resume: cannot use {path}: {e.strerror}") from None
    return path


def select_checkpoint(resume: str, run_dir: Path, verify: bool = True) -> tuple[Path | None, list[str]]:
    """The checkpoint to resume from (or None) and warnings about checkpoints that failed verification.

    `auto`: the newest complete checkpoint that verifies; each one that does not is renamed to
    `corrupt-step-N` and the previous one is tried. `none`: None. A path: that folder, verified.
    With `verify` false nothing is hashed or moved (a read-only preview before the run lock is taken):
    the newest one with a readable meta.json.
    """
    if resume == "none":
        return None, []
    if resume != "auto":
        path = explicit_checkpoint(resume)
        problem = verify_checkpoint(path) if verify else None
        if problem:
            raise CheckpointError(f"train.resume: checkpoint {path} failed verification: {problem}")
        read_meta(path)
        return path, []
    warnings: list[str] = []
    candidates = complete_checkpoints(run_dir)
    for path in reversed(candidates):
        if not verify:
            try:
                read_meta(path)
                return path, []
            except CheckpointError:
                continue
        problem = verify_checkpoint(path)
        if problem is None:
            return path, warnings
        aside = move_aside(path, "corrupt")
        warnings.append(f"warning: checkpoint {path} failed verification ({problem}); moved to {aside}")
    if candidates and verify:
        raise CheckpointError("no intact checkpoint left to resume from:\n  " + "\n  ".join(warnings) +
                              "\nstart over with train.resume=none, or use a new output.run_dir")
    return None, warnings


def check_resume(path: Path, meta: dict, cfg: Config, data: DataRecord, world: int, run_dir: Path,
                 recipe: Recipe) -> Resumed:
    """Whether this config may continue from the checkpoint: same model shape always; the same
    result-changing settings and the same training data unless train.resume_changed=allow."""
    check_compatible(meta, dataclasses.asdict(cfg.model), path)
    saved = meta.get("config", {})
    blocking, neutral = config_changes(saved, cfg.to_dict(), recipe.sections, recipe.neutral)
    data_change = _data_change(meta, data, cfg)
    if data_change is not None:
        blocking.append(data_change)
    if blocking and cfg.train.resume_changed != "allow":
        raise ConfigDrift(
            f"the config differs from the one checkpoint {path} was trained with, in settings that change "
            f"the result:\n  " + "\n  ".join(map(str, blocking)) +
            f"\nEither train into a new output.run_dir (run_dir is {run_dir}), or continue this run with the "
            f"new settings with train.resume_changed=allow (recorded in the run's checkpoints and summary).")
    notes = [f"note: {c} (does not change the result)" for c in neutral]
    notes += [f"note: {c} (allowed by train.resume_changed=allow; recorded)" for c in blocking]
    step = meta["progress"]["step"]
    recorded = meta.get("config_changes", []) + [{"step": step, "key": c.key, "checkpoint": c.saved, "now": c.now}
                                                 for c in blocking]
    if meta.get("world") != world:
        notes.append(f"note: checkpoint was written by {meta.get('world')} processes, now {world}: training "
                     "continues, but the data order is no longer the uninterrupted run's")
    return Resumed(path, meta, notes, recorded)


def _data_change(meta: dict, data: DataRecord, cfg: Config) -> Change | None:
    """The training data as a change, when the checkpoint's differs from this run's (by digest; checkpoints
    of older versions without one: by the shards of the two roots, when the root changed)."""
    saved = meta.get("data")
    if isinstance(saved, dict) and "digest" in saved:
        if saved["digest"] == data.digest and saved.get("split") == data.split:
            return None
        before = DataRecord(saved.get("split", "?"), saved.get("root", "?"), saved.get("shards", 0), saved["digest"])
        return Change("data (training shards)", f"{before.describe()}, in {before.root}",
                      f"{data.describe()}, in {data.root}")
    old_root = meta.get("config", {}).get("data", {}).get("root")
    if old_root == cfg.data.root or _index_digest(old_root, cfg.data.train_split) == data.digest:
        return None
    return Change("data.root", old_root, cfg.data.root)


def _index_digest(root: str | None, split: str) -> str | None:
    try:
        index = json.loads((Path(root) / f"{split}.json").read_text())
        return data_digest(s["sha256"] for s in index["shards"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def continue_position(meta: dict, cfg: Config, steps_epoch: int) -> TrainState:
    """The counters to continue from: the checkpoint's, with the position in the epoch carried over by
    samples when the batch size or accumulation changed (a documented continuation, not exact)."""
    state = TrainState()
    state.load_state_dict(meta["progress"])
    saved_train = meta.get("config", {}).get("train", {})
    old_batch = saved_train.get("batch_size", cfg.train.batch_size)
    old_accum = saved_train.get("grad_accum", cfg.train.grad_accum)
    if (old_batch, old_accum) != (cfg.train.batch_size, cfg.train.grad_accum):
        samples_in_epoch = state.micro * old_batch // old_accum
        state.micro = samples_in_epoch * cfg.train.grad_accum // cfg.train.batch_size
        if state.micro >= steps_epoch * cfg.train.grad_accum:
            state.epoch, state.micro = state.epoch + 1, 0
    return state


class CheckpointManager:
    """A run's checkpoints: resume (verification, fallback, drift refusal, restore), saving (when, what,
    free space, retention), the divergence quarantine and the final export."""

    def __init__(self, parts: Parts, run_dir: Path, data: DataRecord) -> None:
        self.parts, self.run_dir, self.data = parts, run_dir, data
        self.cfg = parts.cfg
        self.last: Path | None = None
        self.changes: list[dict] = []

    @property
    def _world(self) -> int:
        return self.parts.accelerator.num_processes

    def preview_resume(self) -> Resumed | None:
        """Read-only (before the run lock, before anything is written): the checkpoint resume would take,
        checked against this config; raises what resuming would raise, hashes and moves nothing."""
        path, _ = select_checkpoint(self.cfg.train.resume, self.run_dir, verify=False)
        if path is None:
            return None
        return check_resume(path, read_meta(path), self.cfg, self.data, self._world, self.run_dir,
                            self.parts.recipe)

    def resume(self) -> tuple[TrainState, Resumed | None]:
        """Select and verify the checkpoint (all ranks agree; rank 0 moves failed ones aside), check it
        against this config and restore every stateful piece from it; a fresh TrainState without one."""
        path, warnings = collective_call(lambda: select_checkpoint(self.cfg.train.resume, self.run_dir),
                                         main_only=True)
        if path is None:
            return TrainState(), None
        resumed = check_resume(path, read_meta(path), self.cfg, self.data, self._world, self.run_dir,
                               self.parts.recipe)
        resumed.notes[:0] = warnings
        self.last, self.changes = path, resumed.changes
        return self._restore(resumed), resumed

    def _restore(self, resumed: Resumed) -> TrainState:
        acc, parts = self.parts.accelerator, self.parts
        try:
            acc.load_state(str(resumed.path))  # model, optimizer, RNG: each through its load_state_dict
        except (RuntimeError, KeyError, ValueError) as e:
            raise CheckpointError(f"checkpoint {resumed.path} does not fit this model/optimizer: {e}") from None
        acc.step = 0  # Accelerate's micro-step counter: checkpoints are taken on optimizer-step boundaries
        state = continue_position(resumed.meta, self.cfg, parts.steps_per_epoch)
        parts.scheduler.load_state_dict(resumed.meta.get("schedule", {"step": state.step}))
        self.check_finite(state, f"checkpoint {resumed.path}")
        return state

    def check_finite(self, state: TrainState, what: str) -> None:
        """Every rank checks its parameters and buffers; all stop together naming the first bad tensor."""
        net = self.parts.net
        bad = first_nonfinite([*net.named_parameters(), *net.named_buffers()])
        found = [b for b in gather_objects(bad) if b is not None]
        if found:
            raise NonFinite(f"{what}: tensor {found[0]} holds NaN or Inf at step {state.step} (epoch "
                            f"{state.epoch}); nothing was saved. {self._last_good()}")

    def _last_good(self) -> str:
        good = complete_checkpoints(self.run_dir)
        return f"The last good checkpoint is {good[-1]}." if good else "No checkpoint had been saved yet."

    def due(self, state: TrainState) -> bool:
        every = self.cfg.train.checkpoint_every
        return bool(every) and state.step % every == 0

    def maybe_save(self, state: TrainState) -> None:
        if self.due(state):
            self.save(state)

    def expected_bytes(self) -> int:
        """About how large the next checkpoint is: the last one written or resumed from, or the model and
        optimizer tensors (what Accelerate writes, besides a few KB of RNG state), plus a margin."""
        last = folder_bytes(self.last) if self.last is not None and self.last.is_dir() else 0
        tensors = sum(t.numel() * t.element_size() for t in self.parts.net.state_dict().values())
        opt_state = getattr(self.parts.optimizer, "state", {})
        tensors += sum(v.numel() * v.element_size() for s in opt_state.values() for v in s.values()
                       if isinstance(v, torch.Tensor))
        return max(last, tensors) + MB

    def save(self, state: TrainState) -> Path:
        """Check, write, verify-record and commit this step's checkpoint, then apply retention."""
        self.check_finite(state, "before saving a checkpoint")
        meta = {"progress": state.state_dict(), "schedule": self.parts.scheduler.state_dict(),
                "world": self._world, "config": self.cfg.to_dict(), "max_steps": self.parts.max_steps,
                "data": dataclasses.asdict(self.data), "config_changes": self.changes}
        acc = self.parts.accelerator
        self.last = write_checkpoint(step_folder(self.run_dir, state.step),
                                     lambda tmp: acc.save_state(str(tmp), safe_serialization=True),
                                     meta, self.expected_bytes(), acc.is_main_process, collective_call)
        collective_call(self._retain, main_only=True)
        return self.last

    def _retain(self) -> None:
        import shutil
        for old in complete_checkpoints(self.run_dir)[:-self.cfg.train.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)

    def quarantine_diverged(self, state: TrainState, detail: str) -> NonFinite:
        """A non-finite loss at this step was computed with the weights saved at the step before: move that
        checkpoint aside (`diverged-step-N`) so resume never picks it; returns the error to raise."""
        suspect = step_folder(self.run_dir, state.step - 1)

        def move() -> None:
            if suspect.is_dir():
                move_aside(suspect, "diverged")
        collective_call(move, main_only=True)
        last_good = self._last_good()
        return NonFinite(f"non-finite loss at step {state.step} (epoch {state.epoch}; {detail}); "
                         f"{last_good[0].lower()}{last_good[1:]}")

    def finish(self, state: TrainState) -> dict:
        """The final checkpoint (unless this step's exists) and the exported weights; returns summary fields."""
        if self.last is None or self.last.name != step_folder(self.run_dir, state.step).name:
            self.save(state)
        else:
            self.check_finite(state, "before exporting the final weights")
        acc, model = self.parts.accelerator, self.parts.engine
        state_dict = acc.get_state_dict(model)
        path = self.run_dir / FINAL_WEIGHTS_NAME
        digest = collective_call(lambda: export_weights(state_dict, self.cfg.to_dict(), path), main_only=True)
        fields = {"checkpoint": str(self.last), "weights": str(path), "weights_sha256": digest}
        if self.changes:
            fields["config_changes"] = self.changes
        if acc.distributed_type == DistributedType.DEEPSPEED:
            fields["deepspeed"] = {"zero_stage": model.zero_optimization_stage(), "world_size": model.world_size,
                                   "param_dtype": str(next(self.parts.net.parameters()).dtype)}
        return fields
