"""`vwe bench train`: throughput, step-time split, peak memory and MFU of training steps.

Training steps at data.crop_size, batch train.batch_size: data wait (batches from the configured
shards through the real training loader when they exist, else synthetic uint8 images: no wait),
forward + loss, backward, SGD step, under the configured mixed precision. Every configuration runs in a
fresh subprocess so that CPU peak RSS figures do not mix (on a GPU, max_memory_allocated).
MFU = model FLOPs per step (counted once with torch.utils.flop_counter) / step time / the device's peak.
`--compare checkpointing` measures model.grad_checkpointing off and on; `--compare recipe` measures the
published code's fp32 loop (fp32, NCHW, no autocast) against the configuration as given.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from vwe.bench.launches import LAUNCH_STEPS, pace_note, step_launches
from vwe.formats.config import Config, load_config, save_config
from vwe.data.transforms import normalize
from vwe.runtime.device import autocast, peak_memory_mib, synchronize
from vwe.runtime.files import atomic_write
from vwe.runtime.errors import VweError

# --compare NAME: variants as (label, {section: {field: value}}) applied to the loaded config
COMPARISONS: dict[str, list[tuple[str, dict[str, dict]]]] = {
    "checkpointing": [("checkpointing off", {"model": {"grad_checkpointing": False}}),
                      ("checkpointing on", {"model": {"grad_checkpointing": True}})],
    "channels_last": [("contiguous", {"model": {"channels_last": False}}),
                      ("channels_last", {"model": {"channels_last": True}})],
    "recipe": [("published code, fp32", {"model": {"channels_last": False}, "train": {"mixed_precision": "no"}}),
               ("vwe", {})],
    "cudnn_benchmark": [("cuDNN heuristics", {"train": {"cudnn_benchmark": False}}),
                        ("cuDNN autotuned", {"train": {"cudnn_benchmark": True}})],
}
# Dense peak TFLOP/s per GPU (NVIDIA data sheets, SXM parts; no sparsity): bf16/fp16 tensor cores, and
# TF32 for fp32 runs (PyTorch uses TF32 for convolutions by default).
GPU_PEAK_TFLOPS = {"A100": {"bf16": 312.0, "fp16": 312.0, "no": 156.0},
                   "H100": {"bf16": 989.0, "fp16": 989.0, "no": 494.0},
                   "H200": {"bf16": 989.0, "fp16": 989.0, "no": 494.0}}


@dataclass
class TrainFigures:
    """One configuration's figures (what `--json` writes, one per variant)."""
    variant: str
    backbone: str
    device: str
    batch_size: int
    crop_size: int
    mixed_precision: str
    grad_checkpointing: bool
    steps: int
    img_per_s: float
    step_s: float
    forward_s: float
    backward_s: float
    optimizer_s: float
    peak_mem_mib: float
    mem_kind: str           # "peak RSS" (whole process, CPU) or "cuda max_memory_allocated"
    model_mem_mib: float    # the same measure after building the model and optimizer, before any step
                            # (on CPU it includes the ~0.8 GiB RSS of the torch libraries)
    data_wait_s: float = 0.0     # per step; 0 with synthetic input
    input: str = "synthetic"     # or "shards: <root>"
    flops_per_step: float = 0.0  # forward + backward, counted by torch.utils.flop_counter
    peak_tflops: float = 0.0     # the device's peak in this precision (CPU: measured matmul rate)
    mfu: float = 0.0
    ops_per_step: int | None = None          # ATen ops one step dispatches (eager; vwe/bench/launches.py)
    kernels_per_step: int | None = None      # GPU: kernels one step ran (CUDA profiler)
    kernel_s_per_step: float | None = None   # GPU: seconds they ran


def measure(cfg: Config, variant: str, steps: int, warmup: int = 1) -> TrainFigures:
    """Time `steps` training steps (after `warmup` untimed ones) in this process, through the training
    loop's own setup and `micro_step` (same autocast, input casts, optimizer and cuDNN search)."""
    from vwe.training.setup import choose_algorithms

    restore = choose_algorithms(cfg.train)
    try:
        return _timed_steps(cfg, variant, steps, warmup)
    finally:
        restore()


def _timed_steps(cfg: Config, variant: str, steps: int, warmup: int) -> TrainFigures:
    from vwe.training.setup import build_parts, make_accelerator
    from vwe.training.step import PhaseTimer, micro_step

    accelerator = make_accelerator(cfg)
    device = accelerator.device
    torch.manual_seed(cfg.train.seed)
    total = warmup + steps + LAUNCH_STEPS
    bench_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=total))
    parts = build_parts(bench_cfg, accelerator, steps_epoch=total)
    synchronize(device)
    model_mem = peak_memory_mib(device)  # before the FLOP count's forward and backward raise the peak
    b, s = cfg.train.batch_size, cfg.data.crop_size
    batches, source = _input(cfg, device, warmup + steps)
    images, labels = next(batches)
    precision = accelerator.mixed_precision  # `auto` resolved for this device
    flops = count_flops(parts.net, normalize(images), labels, precision, device)
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    timer = PhaseTimer()
    waits: list[float] = []
    for i in range(warmup + steps):
        tw = time.perf_counter()
        if i:
            images, labels = next(batches)
        if i == warmup:
            timer = PhaseTimer()  # drop the warm-up steps
        timer.start()
        t0 = time.perf_counter()
        losses = micro_step(parts, {"image": images, "labels": labels}, mark=timer.mark)
        if not torch.isfinite(losses["loss"]):
            print(f"warning: non-finite loss at step {i} (timings still valid)", file=sys.stderr)
        if i >= warmup:
            waits.append(t0 - tw)
    step = timer.mean("forward") + timer.mean("backward") + timer.mean("optimizer")
    wait = sum(waits) / len(waits)
    peak_mem = peak_memory_mib(device)
    launches = step_launches(lambda: micro_step(parts, {"image": images, "labels": labels}), device,
                             compiled=cfg.train.compile)
    peak = peak_tflops(device, precision)
    return TrainFigures(
        variant=variant, backbone=cfg.model.backbone, device=str(device), batch_size=b, crop_size=s,
        mixed_precision=precision, grad_checkpointing=cfg.model.grad_checkpointing,
        steps=steps, img_per_s=b / (step + wait), step_s=step + wait, forward_s=timer.mean("forward"),
        backward_s=timer.mean("backward"), optimizer_s=timer.mean("optimizer"),
        peak_mem_mib=peak_mem,
        mem_kind="cuda max_memory_allocated" if device.type == "cuda" else "peak RSS",
        model_mem_mib=model_mem, data_wait_s=wait, input=source, flops_per_step=flops, peak_tflops=peak,
        mfu=flops / (step + wait) / (peak * 1e12) if peak else 0.0, **launches)


def _input(cfg: Config, device: torch.device, n: int):
    """(images uint8, labels) batches: from the real training loader when the shards exist, else one
    synthetic batch repeated (no data wait)."""
    from vwe.data.index import index_path, is_remote
    if is_remote(cfg.data.root) or Path(index_path(cfg.data.root, cfg.data.train_split)).is_file():
        from vwe.data.loader import train_batches

        def real():  # the Trainer's stream: every epoch from one set of loader workers
            for batch in train_batches(cfg.data, cfg.train, 0, 1, 0, epochs=None):
                yield (batch["image"].to(device, non_blocking=True),
                       batch["labels"].to(device, non_blocking=True))
        return real(), f"shards: {cfg.data.root}"
    b, s = cfg.train.batch_size, cfg.data.crop_size
    gen = torch.Generator().manual_seed(cfg.train.seed)
    images = torch.randint(0, 256, (b, 3, s, s), dtype=torch.uint8, generator=gen).to(device)
    labels = (torch.rand(b, cfg.model.num_classes, generator=gen) > 0.85).float().to(device)
    labels[:, 0] = 1.0
    return iter(lambda: (images, labels), None), "synthetic"


def count_flops(model: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor, mixed_precision: str,
                device: torch.device) -> float:
    """FLOPs of one forward + loss + backward (torch.utils.flop_counter), without an optimizer step."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter:
        with autocast(mixed_precision, device):
            out = model(x)
            loss = model.losses(out, labels)["loss"]
        loss.backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def peak_tflops(device: torch.device, mixed_precision: str) -> float:
    """The device's peak: data-sheet values for A100/H100/H200, a measured matmul rate on a CPU."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, table in GPU_PEAK_TFLOPS.items():
            if key in name:
                return table[mixed_precision]
        return 0.0  # unknown GPU: MFU not reported
    dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float32
    n = 2048
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = 0.0
    for _ in range(3):  # the best of three rounds: other load only ever lowers a round's rate
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < 0.5:
            a @ b
            reps += 1
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12)
    return best


def measure_in_subprocess(cfg: Config, variant: str, steps: int, warmup: int) -> TrainFigures:
    """measure() in a fresh Python process, so its memory peak is its own."""
    with tempfile.TemporaryDirectory(prefix="vwe-bench-") as tmp:
        cfg_path, out_path = Path(tmp) / "config.yaml", Path(tmp) / "figures.json"
        save_config(cfg, cfg_path)
        cmd = [sys.executable, "-m", "vwe.bench.train", "--config", str(cfg_path), "--variant", variant,
               "--steps", str(steps), "--warmup", str(warmup), "--out", str(out_path)]
        proc = subprocess.run(cmd, text=True, capture_output=True)
        if proc.returncode != 0:
            raise VweError(f"benchmark of '{variant}' failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        return TrainFigures(**json.loads(out_path.read_text()))


def format_table(rows: list[TrainFigures]) -> str:
    head = (f"{'variant':<20} {'img/s':>8} {'step s':>8} {'wait s':>7} {'fwd s':>8} {'bwd s':>8} {'opt s':>8} "
            f"{'peak MiB':>9} {'model MiB':>9} {'step MiB':>9} {'GFLOP':>8} {'MFU':>6}")
    lines = [head]
    for r in rows:
        lines.append(f"{r.variant:<20} {r.img_per_s:8.2f} {r.step_s:8.3f} {r.data_wait_s:7.3f} {r.forward_s:8.3f} "
                     f"{r.backward_s:8.3f} {r.optimizer_s:8.3f} {r.peak_mem_mib:9.0f} {r.model_mem_mib:9.0f} "
                     f"{step_mem(r):9.0f} {r.flops_per_step / 1e9:8.1f} {100 * r.mfu:5.1f}%")
    lines += [f"{r.variant}: {pace_note(asdict(r), r.step_s)}" for r in rows]
    lines.append(f"input: {rows[0].input}; MFU against {rows[-1].peak_tflops:.2f} TFLOP/s "
                 f"({'data sheet' if 'cuda' in rows[-1].device else 'measured matmul peak of this CPU'})")
    return "\n".join(lines)


def compare_summary(rows: list[TrainFigures]) -> dict | None:
    """Second variant relative to the first: memory saved and step time added, in percent."""
    if len(rows) != 2:
        return None
    base, other = rows
    return {"speedup": base.step_s / other.step_s,
            "peak_mem_change_pct": 100.0 * (other.peak_mem_mib / base.peak_mem_mib - 1.0),
            "step_mem_change_pct": 100.0 * (step_mem(other) / step_mem(base) - 1.0),
            "step_time_change_pct": 100.0 * (other.step_s / base.step_s - 1.0)}


def step_mem(row: TrainFigures) -> float:
    """Memory the training steps add on top of the built model and the runtime (activations,
    gradients, optimizer state, temporaries): on CPU the part of peak RSS that is not the libraries."""
    return row.peak_mem_mib - row.model_mem_mib


def with_changes(cfg: Config, changes: dict[str, dict]) -> Config:
    """A copy of cfg with {section: {field: value}} replaced."""
    return dataclasses.replace(cfg, **{sec: dataclasses.replace(getattr(cfg, sec), **fields)
                                       for sec, fields in changes.items()})


def run(cfg: Config, args: argparse.Namespace) -> int:
    """Entry point of `vwe bench train`."""
    steps = args.steps or 5
    compare = getattr(args, "compare", None)
    if compare and compare not in COMPARISONS:
        raise VweError(f"--compare must be one of {', '.join(COMPARISONS)}, got {compare!r}")
    variants = COMPARISONS[compare] if compare else [("as configured", {})]
    rows = []
    for name, changes in variants:
        vcfg = with_changes(cfg, changes)
        print(f"measuring '{name}': {vcfg.model.backbone}, batch {vcfg.train.batch_size}, "
              f"{vcfg.data.crop_size}px, {steps} steps ...", file=sys.stderr, flush=True)
        rows.append(measure_in_subprocess(vcfg, name, steps, warmup=1))
    print(format_table(rows))
    summary = compare_summary(rows)
    if summary:
        print(f"{rows[1].variant} vs {rows[0].variant}: peak memory {summary['peak_mem_change_pct']:+.1f}%, "
              f"step memory {summary['step_mem_change_pct']:+.1f}%, "
              f"step time {summary['step_time_change_pct']:+.1f}% ({summary['speedup']:.2f}x img/s)")
    if args.json:
        atomic_write(args.json, json.dumps({"variants": [asdict(r) for r in rows], "comparison": summary},
                                              indent=2))
    return 0


def _child_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="one benchmark configuration (internal to vwe bench train)")
    p.add_argument("--config", required=True)
    p.add_argument("--variant", required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    figures = measure(load_config(a.config), a.variant, a.steps, a.warmup)
    atomic_write(a.out, json.dumps(asdict(figures)))
    return 0


if __name__ == "__main__":
    sys.exit(_child_main())
