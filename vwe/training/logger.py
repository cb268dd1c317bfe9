"""What a training run reports: progress, metrics.jsonl, TensorBoard, summary.json.

Rank 0 writes; every rank takes part in the mean of the loss terms at each log step. A progress bar is
drawn on a terminal; redirected to a file (SLURM), plain timestamped lines are printed instead, every
`train.log_every` steps. After a resume at step S, metrics.jsonl keeps only the records up to S, and
TensorBoard drops its events past S, so each step is recorded once.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from vwe.runtime.device import peak_memory_mib
from vwe.runtime.dist import sum_over_ranks
from vwe.runtime.files import atomic_write
from vwe.training.setup import Parts, TrainState

METRICS_NAME = "metrics.jsonl"


class Window:
    """Loss terms, micro-batches and data-wait time since the last log line."""

    def __init__(self, samples: int) -> None:
        self.total_micro = 0  # micro-batches this launch, never reset
        self.reset(samples)

    def reset(self, samples: int) -> None:
        self.start, self.samples_at_start = time.perf_counter(), samples
        self.micro, self.wait = 0, 0.0
        self.names: list[str] = []
        self.last_terms: torch.Tensor | None = None
        self.loss_sums: torch.Tensor | None = None

    def add(self, losses: dict[str, torch.Tensor]) -> None:
        self.names = sorted(losses)
        self.last_terms = torch.stack([losses[k].detach().float() for k in self.names])
        self.loss_sums = self.last_terms if self.loss_sums is None else self.loss_sums + self.last_terms
        self.micro += 1
        self.total_micro += 1

    def finite(self) -> bool:
        """No NaN/Inf in any loss term since the last log line (the last step included)."""
        return self.loss_sums is None or bool(torch.isfinite(self.loss_sums).all())

    def last_values(self) -> str:
        if self.last_terms is None:
            return ""
        return ", ".join(f"{k}={v:.4g}" for k, v in zip(self.names, self.last_terms.tolist()))


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the records of steps <= `step` (a resume replays what came after)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except ValueError:
            continue  # a line cut by a kill mid-write
    atomic_write(path, "".join(f"{line}\n" for line in kept), "metrics")


class TrainLogger:
    """Progress display, metrics.jsonl, TensorBoard and the run summary; `close()` on every exit path."""

    def __init__(self, parts: Parts, run_dir: Path, state: TrainState, resumed: bool) -> None:
        self.parts, self.run_dir = parts, run_dir
        self.main = parts.accelerator.is_main_process
        self.cfg = parts.cfg
        self.window = Window(state.samples)
        self.start = (time.perf_counter(), state.step, state.samples)
        self.terminal = sys.stderr.isatty()
        self.bar = tqdm(total=parts.max_steps, initial=state.step, desc="train", dynamic_ncols=True,
                        disable=not (self.main and self.terminal))
        self.metrics = None
        self.tb = None
        if self.main:
            path = run_dir / METRICS_NAME
            if resumed:
                truncate_metrics(path, state.step)
            elif path.exists():
                path.unlink()
            self.metrics = open(path, "a")
            if self.cfg.output.tensorboard:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=state.step + 1 if resumed else None)
                from vwe.formats.configdoc import render_config
                # four-space indent: TensorBoard renders text as markdown
                self.tb.add_text("config", "".join(f"    {line}\n" for line in render_config(self.cfg).splitlines()),
                                 state.step)

    def add(self, losses: dict[str, torch.Tensor]) -> None:
        self.window.add(losses)

    def waited(self, seconds: float) -> None:
        self.window.wait += seconds

    def step(self, state: TrainState) -> None:
        """After each optimizer step: advance the display; at log steps (and the last) write a record."""
        self.bar.update(1)
        if state.step % self.cfg.train.log_every and state.step != self.parts.max_steps:
            return
        w = self.window
        means = sum_over_ranks(w.loss_sums.clone()) / (self.parts.accelerator.num_processes * max(1, w.micro))
        elapsed = max(time.perf_counter() - w.start, 1e-9)
        record: dict = {"step": state.step, "epoch": state.epoch}
        record.update({f"loss/{k}": round(v, 6) for k, v in zip(w.names, means.tolist())})
        for i, g in enumerate(self.parts.optimizer.param_groups):
            record[f"lr/{g.get('name', f'group{i}')}"] = g["lr"]
        record["images_per_s"] = round((state.samples - w.samples_at_start) / elapsed, 2)
        record["data_wait_fraction"] = round(w.wait / elapsed, 4)
        record["peak_memory_mb"] = round(peak_memory_mib(self.parts.device), 1)
        record["skipped_samples"] = state.skipped
        w.reset(state.samples)
        if not self.main:
            return
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        if self.tb is not None:
            for k, v in record.items():
                if k not in ("step", "epoch"):
                    self.tb.add_scalar(k, v, state.step)
        loss = record.get("loss/loss", math.nan)
        if self.terminal:
            self.bar.set_postfix(loss=f"{loss:.4f}", img_s=record["images_per_s"])
        else:
            print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} train step {state.step}/{self.parts.max_steps} "
                  f"epoch {state.epoch} loss {loss:.4f} lr {self.parts.optimizer.param_groups[0]['lr']:.3g} "
                  f"{record['images_per_s']} img/s", file=sys.stderr, flush=True)

    def print(self, message: str) -> None:
        if self.main:
            self.bar.clear()
            print(message, file=sys.stderr, flush=True)

    def summary(self, state: TrainState, extra: dict) -> dict:
        """Write summary.json (rank 0) and print it; returns it."""
        elapsed = time.perf_counter() - self.start[0]
        acc = self.parts.accelerator
        summary = {
            "steps": state.step, "epochs_started": state.epoch + (state.micro > 0),
            "steps_this_run": state.step - self.start[1], "seconds_this_run": round(elapsed, 2),
            "images_per_s": round((state.samples - self.start[2]) / elapsed, 2) if elapsed > 0 else None,
            "samples_seen": state.samples, "skipped_samples": state.skipped, "processes": acc.num_processes,
            "mixed_precision": acc.mixed_precision, "mixed_precision_setting": self.cfg.train.mixed_precision,
            "distributed_type": str(acc.distributed_type).split(".")[-1], **extra,
        }
        if isinstance(self.parts.engine, torch.nn.parallel.DistributedDataParallel):
            summary["ddp_broadcast_buffers"] = self.parts.engine.broadcast_buffers
        if self.main:
            atomic_write(self.run_dir / "summary.json", json.dumps(summary, indent=2), "run summary")
            print("run summary: " + json.dumps(summary), flush=True)
        return summary

    def close(self) -> None:
        self.bar.close()
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None
