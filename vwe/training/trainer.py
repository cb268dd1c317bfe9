"""The training loop of docs/method.md on Accelerate, as a short loop over named components.

Setup builds the parts (vwe/training/setup.py); `micro_step` runs one micro-step (vwe/training/step.py);
the CheckpointManager decides when to save and what may be saved or resumed (vwe/training/checkpointer.py); the
TrainLogger reports (vwe/training/logger.py). Once per optimizer step all ranks agree, in one small
all-reduce, on divergence, preemption and skipped samples. SIGTERM/SIGUSR1 -> checkpoint -> exit 75.
The batches of every epoch come from one loader stream (its workers and prefetch carry on from one epoch
into the next); an epoch ends after its count of micro-batches.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import torch
from accelerate.utils import set_seed

from vwe.formats.config import Config, save_config
from vwe.runtime.dist import collective_call, gather_objects, sum_over_ranks
from vwe.runtime.preempt import PREEMPT_EXIT_CODE, PreemptionFlag
from vwe.runtime.progress import timed_waits
from vwe.runtime.lock import RunLock
from vwe.runtime.skips import SkipPolicy
from vwe.training.checkpointer import CheckpointManager, training_data
from vwe.training.logger import TrainLogger
from vwe.training.recipe import CamRecipe, Recipe
from vwe.training.setup import build_parts, choose_algorithms, make_accelerator
from vwe.training.step import micro_step


class Trainer:
    """Builds a run (every check that can fail comes before anything is written), trains it, and releases
    its resources (lock, signal handlers, metrics file, TensorBoard) on every exit path."""

    def __init__(self, cfg: Config, recipe: Recipe | None = None) -> None:
        self.cfg, self.run_dir = cfg, Path(cfg.output.run_dir)
        self.recipe = recipe or CamRecipe()
        self.accelerator = make_accelerator(cfg)
        set_seed(cfg.train.seed)  # deterministic algorithms: choose_algorithms, below
        self.parts = build_parts(cfg, self.accelerator, self.recipe)  # data and model checks: nothing written yet
        self.checkpoints = CheckpointManager(self.parts, self.run_dir, training_data(cfg))  # shards verified
        self.checkpoints.preview_resume()  # resume path, model shape, drift, data: still nothing written
        self._closers: list = [choose_algorithms(cfg.train)]
        try:
            lock = RunLock(self.run_dir, self.recipe.command)
            note = collective_call(lambda: lock.acquire().note, main_only=True)
            if self.accelerator.is_main_process:
                self._closers.append(lock.release)
            self._setup(cfg, note)
        except BaseException:
            self.close()
            raise

    def _setup(self, cfg: Config, lock_note: str | None) -> None:
        self.state, resumed = self.checkpoints.resume()
        collective_call(lambda: save_config(cfg, self.run_dir / "config.yaml"), main_only=True)
        self.logger = TrainLogger(self.parts, self.run_dir, self.state, resumed is not None)
        self._closers.append(self.logger.close)
        for line in [lock_note, *(resumed.notes if resumed else [])]:
            if line:
                self.logger.print(line)
        if resumed:
            self.logger.print(f"resumed from {resumed.path} at step {self.state.step} (epoch {self.state.epoch})")
        self.skips = SkipPolicy(cfg.data.on_corrupt)  # corrupt samples this rank skipped (data.on_corrupt)
        self._epoch_skips = 0  # all ranks' skipped samples this epoch
        self._data_cpu_s = 0.0  # this rank's loader CPU time (decode + augmentation) this launch
        self.preempt = PreemptionFlag().install()
        self._closers.append(self.preempt.restore)

    def fit(self) -> int:
        """Train to max_steps; returns 0, or PREEMPT_EXIT_CODE after checkpointing on a signal."""
        s, parts = self.state, self.parts
        if self._preempted_before_training():
            return PREEMPT_EXIT_CODE
        micro_per_epoch = parts.steps_per_epoch * self.cfg.train.grad_accum
        with closing(self._batches()) as batches:  # closed: the loader workers stop with the loop
            while s.step < parts.max_steps:
                if s.micro == micro_per_epoch:
                    self._end_epoch()
                batch = next(batches)
                losses = micro_step(parts, batch)
                s.micro += 1
                s.samples += len(batch["key"]) * parts.accelerator.num_processes
                self.logger.add(losses)
                self._data_cpu_s += batch.get("cpu_s", 0.0)
                if not parts.accelerator.sync_gradients:
                    continue
                s.step += 1
                diverged, preempted = self._agree()
                if diverged:
                    raise self.checkpoints.quarantine_diverged(s, f"rank {parts.accelerator.process_index}: "
                                                                  f"{self.logger.window.last_values()}")
                self.logger.step(s)
                if preempted:
                    path = self.checkpoints.save(s)
                    self.logger.print(f"preempted (signal {self.preempt.signal}): checkpoint {path} saved at "
                                      f"step {s.step}; exiting with code {PREEMPT_EXIT_CODE}")
                    return PREEMPT_EXIT_CODE
                self.checkpoints.maybe_save(s)
        self._summary(self.checkpoints.finish(s))
        return 0

    def _preempted_before_training(self) -> bool:
        """A signal during start-up (any rank): exit 75 before the first step. No checkpoint is written: no
        step was taken in this launch, so the checkpoint resumed from (or none) is exactly where the
        requeued job starts again, and the time a step and a save would take may be all the job has left."""
        flags = sum_over_ranks(torch.tensor([float(self.preempt.requested)], device=self.parts.device))
        if not flags[0] > 0:
            return False
        where = f"from {self.checkpoints.last}" if self.checkpoints.last else "from the start"
        sig = f"signal {self.preempt.signal}" if self.preempt.signal else "a signal on another rank"
        self.logger.print(f"preempted ({sig}) before the first step: "
                          f"nothing new to save, the next launch starts {where} (step {self.state.step}); "
                          f"exiting with code {PREEMPT_EXIT_CODE}")
        return True

    def _batches(self) -> Iterator[dict]:
        """This rank's micro-batches from the saved position on, through every later epoch (a stream without
        end), timing the data wait."""
        stream = self.recipe.batches(self.cfg, self.accelerator.process_index, self.accelerator.num_processes,
                                     self.state.epoch, self.state.micro, self.skips)
        with closing(stream):
            yield from timed_waits(stream, self.logger.waited)

    def _agree(self) -> tuple[bool, bool]:
        """One all-reduce per step: non-finite loss anywhere, a preemption signal anywhere, skips summed."""
        flags = sum_over_ranks(torch.tensor([float(not self.logger.window.finite()),
                                         float(self.preempt.requested), float(self.skips.take_window())],
                                        device=self.parts.device))
        self.state.skipped += int(flags[2])
        self._epoch_skips += int(flags[2])
        return bool(flags[0] > 0), bool(flags[1] > 0)

    def _end_epoch(self) -> None:
        """The epoch's skip line (when any were skipped) and the counters moved to the next epoch."""
        if self._epoch_skips:
            self.logger.print(f"epoch {self.state.epoch}: {self._epoch_skips} corrupt sample(s) skipped "
                              f"(data.on_corrupt=skip; {self.state.skipped} in this run so far)")
        self.state.epoch, self.state.micro, self._epoch_skips = self.state.epoch + 1, 0, 0

    def _summary(self, fields: dict) -> None:
        replicas = gather_objects({"batches": self.logger.window.total_micro, "data_cpu_s": self._data_cpu_s,
                                   "weights_digest": weights_digest(self.parts.net)})
        images = self.logger.window.total_micro * self.parts.micro_batch * len(replicas)
        # CPU time the data pipeline spends per image, to compare with the step time per image
        fields["data_cpu_ms_per_image"] = round(1000 * sum(r["data_cpu_s"] for r in replicas) / images, 3) \
            if images else None
        self.skips.merge(gather_objects(self.skips.state()))
        fields.update({"batches_per_rank": [r["batches"] for r in replicas],
                       "replicas_identical": len({r["weights_digest"] for r in replicas}) == 1,
                       "skipped_this_run": self.skips.report()})
        self.logger.summary(self.state, fields)
        if self.skips.total:
            self.logger.print(f"warning: {self.skips.summary(f'over {self.accelerator.num_processes} process(es)')}")

    def close(self) -> None:
        for close in reversed(self._closers):
            close()
        self._closers.clear()


def train(cfg: Config, recipe: Recipe | None = None) -> int:
    """Train the recipe's network (default: the CAM network of cfg.model on cfg.data.train_split); returns
    0, or PREEMPT_EXIT_CODE."""
    trainer = Trainer(cfg, recipe)
    try:
        code = trainer.fit()
    finally:
        trainer.close()
    trainer.accelerator.wait_for_everyone()  # the exported weights exist for every rank (vwe pipeline infers next)
    return code


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 over parameters and buffers: equal digests mean bit-identical replicas.

    BatchNorm running statistics are left out: each rank updates them from its own batch, and DDP
    broadcasts rank 0's before every forward (the exported weights are rank 0's).
    """
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if name.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked"):
            continue
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
