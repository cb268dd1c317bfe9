"""When and how a run saves, verifies, resumes and exports.

Resume takes the newest checkpoint whose files all match their recorded SHA-256 (others are moved aside
with a warning), refuses a config that would change the result unless `train.resume_changed: allow`
(recorded in the run), and continues the data stream where the checkpoint left it. Before every save and
before the export, every parameter and buffer is checked to be finite: nothing non-finite is ever saved.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from accelerate.utils import DistributedType

from vwe.formats.checkpoint import (FINAL_WEIGHTS_NAME, check_compatible, complete_checkpoints, export_weights,
                            first_nonfinite, quarantine_diverged, read_meta, save_checkpoint, select_checkpoint)
from vwe.formats.config import Config
from vwe.runtime.dist import collective_call, gather_objects
from vwe.runtime.errors import CheckpointError, VweError
from vwe.training.drift import Change, config_changes
from vwe.training.setup import Parts, TrainState


class ConfigDrift(VweError):
    """The config differs from the checkpoint's in keys that change what training computes."""


class NonFinite(VweError):
    """A loss, parameter or buffer became NaN or Inf; the last good checkpoint is kept."""


@dataclasses.dataclass
class Resumed:
    """A checkpoint chosen and checked for this config (before anything is built or written)."""
    path: Path
    meta: dict
    notes: list[str]        # printed: moved-aside checkpoints, neutral config changes, layout changes
    changes: list[dict]     # result-changing config changes allowed by train.resume_changed (recorded)


def choose_checkpoint(cfg: Config, run_dir: Path, world: int) -> Resumed | None:
    """Pick and verify the checkpoint to resume from, and check the config against it (all ranks agree)."""
    path, notes = collective_call(lambda: select_checkpoint(cfg.train.resume, run_dir), main_only=True)
    if path is None:
        for note in notes:
            print(note)
        return None
    meta = read_meta(path)
    check_compatible(meta, dataclasses.asdict(cfg.model), path)
    saved = meta.get("config", {})
    blocking, neutral = config_changes(saved, cfg.to_dict())
    if any(c.key == "data.root" for c in neutral) and not _same_data(saved, cfg):
        neutral = [c for c in neutral if c.key != "data.root"]
        blocking.append(Change("data.root", saved["data"]["root"], cfg.data.root))
    if blocking and cfg.train.resume_changed != "allow":
        raise ConfigDrift(
            f"the config differs from the one checkpoint {path} was trained with, in settings that change "
            f"the result:\n  " + "\n  ".join(map(str, blocking)) +
            f"\nEither train into a new output.run_dir (run_dir is {run_dir}), or continue this run with the "
            f"new settings with train.resume_changed=allow (recorded in the run's checkpoints and summary).")
    notes = list(notes)
    notes += [f"note: {c} (does not change the result)" for c in neutral]
    notes += [f"note: {c} (allowed by train.resume_changed=allow; recorded)" for c in blocking]
    step = meta["progress"]["step"]
    recorded = meta.get("config_changes", []) + [{"step": step, "key": c.key, "checkpoint": c.saved, "now": c.now}
                                                 for c in blocking]
    if meta.get("world") != world:
        notes.append(f"note: checkpoint was written by {meta.get('world')} processes, now {world}: training "
                     "continues, but the data order is no longer the uninterrupted run's")
    return Resumed(path, meta, notes, recorded)


def _same_data(saved: dict, cfg: Config) -> bool:
    """Both data roots hold the same training split (same shard checksums in the index)."""
    def digests(root: str) -> list | None:
        try:
            index = json.loads((Path(root) / f"{cfg.data.train_split}.json").read_text())
            return [s.get("sha256") for s in index["shards"]]
        except (OSError, ValueError, KeyError, TypeError):
            return None
    old = digests(saved.get("data", {}).get("root", ""))
    return old is not None and old == digests(cfg.data.root)


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


class Checkpointer:
    """Decides when the run saves, checks what it saves, and exports the final weights."""

    def __init__(self, parts: Parts, run_dir: Path, resumed: Resumed | None) -> None:
        self.parts, self.run_dir = parts, run_dir
        self.cfg = parts.cfg
        self.last: Path | None = resumed.path if resumed else None
        self.changes = resumed.changes if resumed else []

    def load(self, resumed: Resumed) -> TrainState:
        """Restore model, optimizer and RNG state from the verified checkpoint; returns the counters."""
        acc = self.parts.accelerator
        try:
            acc.load_state(str(resumed.path))
        except (RuntimeError, KeyError, ValueError) as e:
            raise CheckpointError(f"checkpoint {resumed.path} does not fit this model/optimizer: {e}") from None
        acc.step = 0  # checkpoints are taken on optimizer-step boundaries
        state = continue_position(resumed.meta, self.cfg, self.parts.steps_per_epoch)
        self.parts.position_schedule(state.step)
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

    def save(self, state: TrainState) -> Path:
        self.check_finite(state, "before saving a checkpoint")
        meta = {"progress": state.state_dict(), "world": self.parts.accelerator.num_processes,
                "config": self.cfg.to_dict(), "max_steps": self.parts.max_steps,
                "config_changes": self.changes}
        self.last = save_checkpoint(self.parts.accelerator, self.run_dir, meta, self.cfg.train.keep_checkpoints)
        return self.last

    def maybe_save(self, state: TrainState) -> None:
        if self.due(state):
            self.save(state)

    def diverged(self, state: TrainState, detail: str) -> NonFinite:
        """A non-finite loss at this step: move aside the checkpoint whose weights produced it."""
        collective_call(lambda: quarantine_diverged(self.run_dir, state.step), main_only=True)
        last_good = self._last_good()
        return NonFinite(f"non-finite loss at step {state.step} (epoch {state.epoch}; {detail}); "
                         f"{last_good[0].lower()}{last_good[1:]}")

    def finish(self, state: TrainState) -> dict:
        """The final checkpoint (unless this step's exists) and the exported weights; returns summary fields."""
        if self.last is None or self.last.name != f"step-{state.step:06d}":
            self.save(state)
        else:
            self.check_finite(state, "before exporting the final weights")
        acc, model = self.parts.accelerator, self.parts.model
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
