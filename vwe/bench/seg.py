"""`vwe bench seg`: the segmentation network's training steps and predictions (docs/benchmarks.md).

Training: optimizer steps as `vwe segment` runs them on one process: `seg.grad_accum` micro-batches of
`seg.batch_size / seg.grad_accum` crops (or, with `seg.fuse_micro_batches`, one batch of them all) of
`seg.crop_size` through the Trainer's own setup and `micro_step` with the SegRecipe (MSC inputs and
losses, the recipe's parameter groups, `seg.mixed_precision`), on synthetic uint8 images and label maps.
Prediction: `predict_probs` at `seg.test_scales` (+ flip) on VOC-sized images (long side 500, three
aspect ratios), one image per forward as `vwe segment-eval` runs it.
MFU = FLOPs counted once with torch.utils.flop_counter / time / the device's peak (vwe bench train).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch

from vwe.bench.launches import LAUNCH_STEPS, pace_note, step_launches
from vwe.bench.train import peak_tflops
from vwe.data.transforms import normalize
from vwe.formats.config import Config
from vwe.runtime.device import autocast, peak_memory_mib, resolve_precision, synchronize
from vwe.runtime.files import atomic_write

VOC_SIZES = ((375, 500), (500, 375), (333, 500))  # (H, W) of typical VOC images


def _flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return float(counter.get_total_flops())


def measure_training(cfg: Config, steps: int, warmup: int = 1) -> dict:
    """Seconds per optimizer step, img/s, peak memory and MFU of DeepLab training steps."""
    from vwe.data.loader import micro_batch_size
    from vwe.stages.segment import SegRecipe, seg_training_config
    from vwe.training.setup import build_parts, choose_algorithms, make_accelerator
    from vwe.training.step import micro_step

    tcfg = seg_training_config(cfg)  # the command's: grad_accum micro-batches, or one fused batch
    total = warmup + steps + LAUNCH_STEPS
    tcfg = dataclasses.replace(tcfg, train=dataclasses.replace(tcfg.train, max_steps=total))
    accelerator = make_accelerator(tcfg)
    device = accelerator.device
    recipe = SegRecipe(cfg)
    parts = build_parts(tcfg, accelerator, recipe, steps_epoch=total)
    accum = tcfg.train.grad_accum
    b, s = micro_batch_size(tcfg.train, accelerator.num_processes), tcfg.data.crop_size
    gen = torch.Generator().manual_seed(0)
    batch = {"image": torch.randint(0, 256, (b, 3, s, s), dtype=torch.uint8, generator=gen).to(device),
             "target": torch.randint(0, 21, (b, s, s), dtype=torch.uint8, generator=gen)}
    precision = accelerator.mixed_precision

    def forward_backward() -> None:
        with autocast(precision, device):
            out = parts.engine(normalize(batch["image"]))
        recipe.losses(parts.net, out, batch, device)["loss"].backward()
    flops = _flops(forward_backward) * accum
    parts.optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    restore = choose_algorithms(tcfg.train)  # as `vwe segment` runs; prediction (next) runs without
    try:
        for i in range((warmup + steps) * accum):
            if i == warmup * accum:
                synchronize(device)
                t0 = time.perf_counter()
            micro_step(parts, batch)
        synchronize(device)
        step = (time.perf_counter() - t0) / steps
        autotuned = torch.backends.cudnn.benchmark and device.type == "cuda"  # the setting, unless deterministic
        launches = step_launches(lambda: [micro_step(parts, batch) for _ in range(accum)], device,
                                 compiled=tcfg.train.compile)
    finally:
        restore()
    peak = peak_tflops(device, precision)
    return {"backbone": cfg.seg.backbone, "device": str(device), "mixed_precision": precision,
            "batch_size": b * accum, "micro_batches": accum, "fused": cfg.seg.fuse_micro_batches,
            "cudnn_benchmark": autotuned, "compiled": tcfg.train.compile,
            "crop_size": s, "msc_scales": list(cfg.seg.msc_scales), "steps": steps, "step_s": round(step, 4),
            "img_per_s": round(b * accum / step, 2), "peak_mem_mib": round(peak_memory_mib(device), 1),
            "gflop_per_step": round(flops / 1e9, 1), "peak_tflops": round(peak, 2),
            "mfu": round(flops / step / (peak * 1e12), 4) if peak else 0.0, **launches}


@torch.no_grad()
def measure_prediction(cfg: Config, images: int) -> dict:
    """img/s and MFU of multi-scale prediction on VOC-sized images (no CRF: CPU work, timed apart)."""
    from vwe.nets.deeplab import build_deeplab, predict_probs
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sc = cfg.seg
    precision = resolve_precision(sc.infer_precision, device)
    net = build_deeplab(sc.num_classes, sc.backbone, "none", sc.norm, tuple(sc.aspp_rates)).eval().to(device)
    gen = torch.Generator().manual_seed(0)
    batch = [torch.randint(0, 256, (1, 3, h, w), dtype=torch.uint8, generator=gen).to(device) for h, w in VOC_SIZES]

    def predict(x: torch.Tensor) -> torch.Tensor:
        with autocast(precision, device):
            return predict_probs(net, normalize(x), tuple(sc.test_scales), sc.test_flip)
    flops = sum(_flops(lambda x=x: predict(x)) for x in batch) / len(batch)
    for x in batch:  # warm-up: every shape once
        predict(x)
    synchronize(device)
    t0 = time.perf_counter()
    for i in range(images):
        predict(batch[i % len(batch)]).cpu()
    seconds = (time.perf_counter() - t0) / images
    peak = peak_tflops(device, precision)
    return {"backbone": sc.backbone, "device": str(device), "mixed_precision": precision,
            "test_scales": list(sc.test_scales), "test_flip": sc.test_flip, "images": images,
            "img_per_s": round(1 / seconds, 2), "gflop_per_image": round(flops / 1e9, 1),
            "mfu": round(flops / seconds / (peak * 1e12), 4) if peak else 0.0}


def run(cfg: Config, args: argparse.Namespace) -> int:
    steps = args.steps or 5
    figures = {"training": measure_training(cfg, steps), "prediction": measure_prediction(cfg, max(3, steps))}
    t, p = figures["training"], figures["prediction"]
    layout = f"{t['micro_batches']} x {t['batch_size'] // t['micro_batches']}" if t["micro_batches"] > 1 else (
        f"one fused batch of {cfg.seg.grad_accum} micro-batches" if t["fused"] else "one batch")
    print(f"segmentation training ({t['backbone']}, batch {t['batch_size']} ({layout}) x {t['crop_size']}px, MSC "
          f"{t['msc_scales']}, {t['mixed_precision']}, {t['device']}"
          f"{', cuDNN autotuned' if t['cudnn_benchmark'] else ''}"
          f"{', compiled' if t['compiled'] else ''}): "
          f"{t['img_per_s']} img/s, {t['step_s']} s/step, "
          f"{t['gflop_per_step']} GFLOP/step, MFU {100 * t['mfu']:.1f}%, peak {t['peak_mem_mib']} MiB; "
          f"{pace_note(t, t['step_s'])}")
    print(f"segmentation prediction (scales {p['test_scales']}{', flip' if p['test_flip'] else ''}, "
          f"{p['mixed_precision']}): {p['img_per_s']} img/s, {p['gflop_per_image']} GFLOP/image, "
          f"MFU {100 * p['mfu']:.1f}%")
    if args.json:
        atomic_write(args.json, json.dumps(figures, indent=2), "benchmark results")
    return 0
