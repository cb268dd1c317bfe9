"""The training loop of docs/method.md on Accelerate.

config -> data -> model -> SGD -> poly schedule -> steps with gradient accumulation -> log -> checkpoint.
Resumes from the newest complete checkpoint, checkpoints and exits with PREEMPT_EXIT_CODE on
SIGTERM/SIGUSR1, and stops on a non-finite loss without saving over the last good checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import (DistributedType, GradientAccumulationPlugin, InitProcessGroupKwargs,
                              ProjectConfiguration, set_seed)
from tqdm import tqdm

from vwe.checkpoint import (FINAL_WEIGHTS_NAME, complete_checkpoints, export_weights, load_checkpoint,
                            quarantine_diverged, resolve_resume, save_checkpoint)
from vwe.config import Config, ConfigError, save_config
from vwe.data.loader import micro_batch_size, steps_per_epoch, train_batches
from vwe.data.transforms import normalize
from vwe.device import peak_memory_mib
from vwe.dist import gather_objects
from vwe.errors import VweError
from vwe.model.net import build_model, param_groups
from vwe.preempt import PREEMPT_EXIT_CODE, PreemptionFlag



class TrainingDiverged(VweError):
    """The loss became NaN or Inf; the last good checkpoint is kept."""


@dataclass
class Progress:
    """Counters saved with every checkpoint; `micro` counts micro-batches done in the current epoch."""
    step: int = 0
    epoch: int = 0
    micro: int = 0
    samples: int = 0
    skipped: int = 0


def poly_factor(step: int, max_steps: int, power: float) -> float:
    """Polynomial decay `(1 - step / max_steps) ** power`."""
    return (1 - min(step, max_steps) / max_steps) ** power


def make_accelerator(cfg: Config, run_dir: Path) -> Accelerator:
    cuda = torch.cuda.is_available()
    if cfg.train.mixed_precision == "fp16" and not cuda:
        raise ConfigError("train.mixed_precision=fp16 needs a GPU (fp16 loss scaling is not supported on CPU); "
                          "use bf16 on CPU")
    if cfg.train.mixed_precision == "bf16" and not cuda and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        print("warning: this CPU has no native bf16 (oneDNN reports none): bf16 autocast is emulated and was "
              "measured >10x slower than fp32 on such a CPU (docs/benchmarks.md); train.mixed_precision=no "
              "is faster here", file=sys.stderr)
    # Without a GPU the ranks only form a group if Accelerate is told so: cpu=True for plain data
    # parallelism (launch/cpu.yaml), or the gloo backend named for DeepSpeed, which cpu=True would
    # silently switch off. In a single process no backend may be named (there is no group to join).
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true")
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    handlers = [InitProcessGroupKwargs(backend="gloo")] if launched and deepspeed and not cuda else []
    return Accelerator(
        cpu=not cuda and not deepspeed,
        mixed_precision=cfg.train.mixed_precision,
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=cfg.train.grad_accum,
                                                                sync_with_dataloader=False),
        log_with="tensorboard" if cfg.output.tensorboard else None,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "tb")),
        kwargs_handlers=handlers,
    )


def configure_deepspeed(accelerator: Accelerator, micro_batch: int, cfg: Config) -> None:
    """Fill DeepSpeed's batch fields from our config: we pass no DataLoader for Accelerate to infer them."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    for key, ours in (("train_micro_batch_size_per_gpu", micro_batch),
                      ("gradient_accumulation_steps", cfg.train.grad_accum)):
        if ds.get(key, "auto") == "auto":
            ds[key] = ours
        elif int(ds[key]) != ours:
            raise ConfigError(f"DeepSpeed config sets {key}={ds[key]} but the vwe config implies {ours} "
                              f"(train.batch_size / processes / train.grad_accum)")
    ds["train_batch_size"] = micro_batch * cfg.train.grad_accum * accelerator.num_processes


def reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def train(cfg: Config) -> int:
    """Train the network of cfg.model on cfg.data.train_split; returns 0, or PREEMPT_EXIT_CODE."""
    run_dir = Path(cfg.output.run_dir)
    accelerator = make_accelerator(cfg, run_dir)
    device, world, rank = accelerator.device, accelerator.num_processes, accelerator.process_index
    micro_batch = micro_batch_size(cfg, world)
    if accelerator.distributed_type == DistributedType.DEEPSPEED and cfg.model.channels_last:
        # DeepSpeed broadcasts parameters as byte views, which channels_last weights do not allow
        accelerator.print("note: model.channels_last is turned off under DeepSpeed")
        cfg.model.channels_last = False
    if accelerator.is_main_process:
        save_config(cfg, run_dir / "config.yaml")
    set_seed(cfg.train.seed, deterministic=cfg.train.deterministic)

    # model and optimizer: backbone at lr, new layers at lr x head_lr_mult (docs/method.md)
    model = build_model(cfg.model)  # channels_last weights when cfg.model.channels_last
    if cfg.train.compile:
        model = torch.compile(model)
    groups = param_groups(model, cfg.train.lr, cfg.train.head_lr_mult, cfg.train.weight_decay)
    optimizer = torch.optim.SGD(groups, lr=cfg.train.lr, momentum=cfg.train.momentum,
                                weight_decay=cfg.train.weight_decay)
    configure_deepspeed(accelerator, micro_batch, cfg)
    model, optimizer = accelerator.prepare(model, optimizer)
    net = accelerator.unwrap_model(model)
    # DeepSpeed runs bf16/fp16 by casting the weights (no autocast): inputs must match them
    input_dtype = next(net.parameters()).dtype if accelerator.distributed_type == DistributedType.DEEPSPEED \
        else torch.float32
    base_lrs = [g["lr"] for g in optimizer.param_groups]

    steps_epoch = steps_per_epoch(cfg)
    max_steps = cfg.train.max_steps or cfg.train.epochs * steps_epoch

    # resume: the newest complete checkpoint of this run (train.resume: auto), or the one named
    progress = Progress()
    resume_from = resolve_resume(cfg.train.resume, run_dir)
    if resume_from is not None:
        meta = load_checkpoint(accelerator, resume_from, asdict(cfg.model))
        progress = Progress(**meta["progress"])
        accelerator.step = 0  # checkpoints are taken on optimizer-step boundaries
        accelerator.print(f"resumed from {resume_from} at step {progress.step} (epoch {progress.epoch})")
        if meta.get("world") != world:
            accelerator.print(f"warning: checkpoint was written by {meta.get('world')} processes, now {world}: "
                              "training continues, but the data order is no longer the uninterrupted run's")
    if cfg.output.tensorboard:
        accelerator.init_trackers("train")

    def checkpoint() -> Path:
        meta = {"progress": asdict(progress), "world": world, "config": cfg.to_dict(), "max_steps": max_steps}
        return save_checkpoint(accelerator, run_dir, meta, cfg.train.keep_checkpoints)

    preempt = PreemptionFlag().install()
    bar = tqdm(total=max_steps, initial=progress.step, disable=not accelerator.is_main_process,
               desc="train", dynamic_ncols=True)
    metrics_file = open(run_dir / "metrics.jsonl", "a") if accelerator.is_main_process else None
    window = Window(time.perf_counter(), progress.samples)
    start_time, start_step, start_samples = time.perf_counter(), progress.step, progress.samples
    last_checkpoint: Path | None = resume_from
    pending_skips = epoch_skips = 0  # this rank's skips since the last step; all ranks' this epoch

    while progress.step < max_steps:
        for batch in _timed(train_batches(cfg, rank, world, progress.epoch, start_batch=progress.micro), window):
            with accelerator.accumulate(model):
                images = normalize(batch["image"].to(device, non_blocking=True)).to(input_dtype)
                if cfg.model.channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                labels = batch["labels"].to(device, non_blocking=True)
                with accelerator.autocast():
                    out = model(images)
                losses = net.losses(out, labels)
                accelerator.backward(losses["loss"])
                if accelerator.sync_gradients:
                    factor = poly_factor(progress.step, max_steps, cfg.train.poly_power)
                    for group, base in zip(optimizer.param_groups, base_lrs):
                        group["lr"] = base * factor
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            progress.micro += 1
            progress.samples += len(batch["key"]) * world
            pending_skips += int(batch.get("skipped", 0))
            window.add(losses)
            if not accelerator.sync_gradients:
                continue

            # one small all-reduce per step: divergence and preemption are decided by all ranks together
            progress.step += 1
            terms = window.last_terms
            # the window's sums hold every micro-batch since the last log line: NaN anywhere shows there
            flags = reduce_sum(torch.tensor([float(not torch.isfinite(window.loss_sums).all()),
                                             float(preempt.signal is not None), float(pending_skips)],
                                            device=terms.device))
            progress.skipped += int(flags[2])  # corrupt samples skipped by all ranks (data.on_corrupt=skip)
            epoch_skips += int(flags[2])
            pending_skips = 0
            if flags[0] > 0:
                bar.close()
                accelerator.wait_for_everyone()
                if accelerator.is_main_process:
                    quarantine_diverged(run_dir, progress.step)
                accelerator.wait_for_everyone()
                last_checkpoint = (complete_checkpoints(run_dir) or [None])[-1]
                where = (f"; the last good checkpoint is {last_checkpoint}" if last_checkpoint
                         else "; no checkpoint had been saved yet")
                values = ", ".join(f"{k}={v:.4g}" for k, v in zip(window.names, terms.tolist()))
                raise TrainingDiverged(f"non-finite loss at step {progress.step} (epoch {progress.epoch}; "
                                       f"rank {rank}: {values}){where}")
            bar.update(1)
            if progress.step % cfg.train.log_every == 0 or progress.step == max_steps:
                _log(accelerator, bar, metrics_file, window, optimizer, progress, device)
            if flags[1] > 0:
                last_checkpoint = checkpoint()
                bar.close()
                accelerator.print(f"preempted (signal {preempt.signal}): checkpoint {last_checkpoint} saved at "
                                  f"step {progress.step}; exiting with code {PREEMPT_EXIT_CODE}")
                _finish_trackers(accelerator)
                return PREEMPT_EXIT_CODE
            if cfg.train.checkpoint_every and progress.step % cfg.train.checkpoint_every == 0:
                last_checkpoint = checkpoint()
            if progress.step >= max_steps:
                break
        else:  # the epoch's batches are exhausted
            if epoch_skips:
                accelerator.print(f"epoch {progress.epoch}: {epoch_skips} corrupt sample(s) skipped "
                                  f"(data.on_corrupt=skip; {progress.skipped} in this run so far)")
            progress.epoch += 1
            progress.micro = 0
            epoch_skips = 0
    bar.close()

    if last_checkpoint is None or last_checkpoint.name != f"step-{progress.step:06d}":
        last_checkpoint = checkpoint()
    weights_hash = None
    state_dict = accelerator.get_state_dict(model)
    replicas = gather_objects({"rank": rank, "batches": window.total_micro, "weights_digest": weights_digest(net)})
    if accelerator.is_main_process:
        weights_hash = export_weights(state_dict, cfg.to_dict(), run_dir / FINAL_WEIGHTS_NAME)
        elapsed = time.perf_counter() - start_time
        done = progress.step - start_step
        summary = {
            "steps": progress.step, "epochs_started": progress.epoch + (progress.micro > 0),
            "steps_this_run": done, "seconds_this_run": round(elapsed, 2),
            "images_per_s": round((progress.samples - start_samples) / elapsed, 2) if elapsed > 0 else None,
            "samples_seen": progress.samples, "skipped_samples": progress.skipped,
            "processes": world, "checkpoint": str(last_checkpoint),
            "weights": str(run_dir / FINAL_WEIGHTS_NAME), "weights_sha256": weights_hash,
            "batches_per_rank": [r["batches"] for r in replicas],
            "replicas_identical": len({r["weights_digest"] for r in replicas}) == 1,
            "mixed_precision": accelerator.mixed_precision,
            "distributed_type": str(accelerator.distributed_type).split(".")[-1],
        }
        if accelerator.distributed_type == DistributedType.DEEPSPEED:
            summary["deepspeed"] = {"zero_stage": model.zero_optimization_stage(),
                                    "world_size": model.world_size,
                                    "param_dtype": str(next(net.parameters()).dtype)}
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        print("run summary: " + json.dumps(summary))
        if progress.skipped:
            print(f"warning: {progress.skipped} corrupt sample(s) were skipped (data.on_corrupt=skip)")
        metrics_file.close()
    _finish_trackers(accelerator)
    accelerator.wait_for_everyone()  # the exported weights exist for every rank (vwe pipeline infers next)
    return 0


class Window:
    """Accumulates loss terms, steps and data-wait time between two log lines."""

    def __init__(self, start: float, samples: int) -> None:
        self.total_micro = 0  # micro-batches this launch, never reset
        self.reset(start, samples)

    def reset(self, start: float, samples: int) -> None:
        self.start, self.samples_at_start = start, samples
        self.micro, self.wait = 0, 0.0
        self.loss_sums: torch.Tensor | None = None

    def add(self, losses: dict[str, torch.Tensor]) -> None:
        self.names = sorted(losses)
        self.last_terms = torch.stack([losses[k].detach().float() for k in self.names])
        self.loss_sums = self.last_terms if self.loss_sums is None else self.loss_sums + self.last_terms
        self.micro += 1
        self.total_micro += 1


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


def _timed(batches, window: Window):
    """Yield from `batches`, adding the time spent waiting for each to the window."""
    it = iter(batches)
    while True:
        t0 = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            return
        window.wait += time.perf_counter() - t0
        yield batch


def _finish_trackers(accelerator: Accelerator) -> None:
    """Flush TensorBoard; unlike accelerator.end_training(), keep the process group for the next stage."""
    for tracker in accelerator.trackers:
        tracker.finish()


def _log(accelerator, bar, metrics_file, window: Window, optimizer, progress: Progress, device) -> None:
    """Mean loss terms over the window and all ranks; lr per group; throughput; data wait; memory."""
    means = reduce_sum(window.loss_sums.clone()) / (accelerator.num_processes * max(1, window.micro))
    elapsed = max(time.perf_counter() - window.start, 1e-9)
    record = {"step": progress.step, "epoch": progress.epoch}
    record.update({f"loss/{k}": round(v, 6) for k, v in zip(window.names, means.tolist())})
    record.update({f"lr/group{i}": g["lr"] for i, g in enumerate(optimizer.param_groups)})
    record["images_per_s"] = round((progress.samples - window.samples_at_start) / elapsed, 2)
    record["data_wait_fraction"] = round(window.wait / elapsed, 4)
    record["peak_memory_mb"] = round(peak_memory_mib(device), 1)
    record["skipped_samples"] = progress.skipped
    accelerator.log(record, step=progress.step)
    if metrics_file is not None:
        metrics_file.write(json.dumps(record) + "\n")
        metrics_file.flush()
    bar.set_postfix(loss=f"{record.get('loss/loss', math.nan):.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}",
                    img_s=record["images_per_s"])
    window.reset(time.perf_counter(), progress.samples)
