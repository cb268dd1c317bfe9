"""`vwe bench data`: images/s of the training pipeline, of JPEG decoding alone, and of a 2021-style reader.

All three work on the same images: the first samples of the training split's shards. The 2021-style
reader is what the seed code did per file: PIL decode, PIL resize, float32 NumPy normalisation and
crop, in a map-style Dataset with the same number of DataLoader workers.
"""
from __future__ import annotations

import io
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from vwe.data.loader import steps_per_epoch, train_batches
from vwe.data.shards import iter_shard, load_index
from vwe.data.transforms import IMAGENET_MEAN, IMAGENET_STD


def _first_jpegs(cfg, n: int) -> list[tuple[str, bytes]]:
    idx = load_index(cfg.data.root, cfg.data.train_split)
    out: list[tuple[str, bytes]] = []
    for s in idx.shards:
        for raw in iter_shard(idx.path(s), s.count):
            out.append((raw.key, raw.jpg))
            if len(out) == n:
                return out
    return out


def decode_only_rate(jpegs: list[bytes], min_seconds: float = 2.0) -> float:
    """Full-resolution RGB decodes per second in this process (the floor of any JPEG pipeline)."""
    n, t0 = 0, time.perf_counter()
    while True:
        for data in jpegs:
            im = Image.open(io.BytesIO(data))
            im.load()
            if im.mode != "RGB":
                im = im.convert("RGB")
            n += 1
        if time.perf_counter() - t0 >= min_seconds:
            return n / (time.perf_counter() - t0)


class _DecodeOnly(Dataset):
    """Decode each JPEG to full-resolution RGB and return only its key (no transfer cost)."""

    def __init__(self, jpegs: list[tuple[str, bytes]]):
        self.jpegs = jpegs

    def __len__(self) -> int:
        return len(self.jpegs)

    def __getitem__(self, i: int) -> str:
        key, data = self.jpegs[i]
        im = Image.open(io.BytesIO(data))
        im.load()
        if im.mode != "RGB":
            im.convert("RGB")
        return key


class Reader2021(Dataset):
    """Per-file reader as in the 2021 seed code: decode, random long-side resize, flip, normalise, crop."""

    def __init__(self, files: list[Path], long_side: tuple[int, int], crop: int):
        self.files, self.long_side, self.crop = files, long_side, crop
        self.mean, self.std = np.array(IMAGENET_MEAN), np.array(IMAGENET_STD)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict:
        rng = np.random.default_rng(i)
        img = np.asarray(Image.open(self.files[i]).convert("RGB"))
        target = rng.integers(self.long_side[0], self.long_side[1] + 1)
        h, w = img.shape[:2]
        s = target / max(h, w)
        img = np.asarray(Image.fromarray(img).resize((round(w * s), round(h * s)), Image.BICUBIC))
        if rng.random() < 0.5:
            img = np.fliplr(img)
        img = (img.astype(np.float32) / 255.0 - self.mean) / self.std
        h, w = img.shape[:2]
        c = self.crop
        out = np.zeros((c, c, 3), np.float32)
        ch, cw = min(c, h), min(c, w)
        y0, x0 = rng.integers(h - ch + 1), rng.integers(w - cw + 1)
        oy, ox = rng.integers(c - ch + 1), rng.integers(c - cw + 1)
        out[oy:oy + ch, ox:ox + cw] = img[y0:y0 + ch, x0:x0 + cw]
        return {"img": torch.from_numpy(out.transpose(2, 0, 1).copy()), "name": self.files[i].stem}


def _loader_rate(batches, batch_size: int, n_batches: int) -> float:
    """Images/s over n_batches after the first (worker start-up and the first fetch are excluded)."""
    it = iter(batches)
    next(it)
    t0, n = time.perf_counter(), 0
    for _ in range(n_batches):
        b = next(it)
        n += len(b["key"] if isinstance(b, dict) and "key" in b else b["name"] if isinstance(b, dict) else b)
    return n / (time.perf_counter() - t0)


def _pipeline_batches(cfg):
    epoch = 0
    while True:
        yield from train_batches(cfg, 0, 1, epoch)
        epoch += 1


def run(cfg, args) -> int:
    """Print (and with --json write) the three rates and their ratios."""
    workers = cfg.data.num_workers if args.workers is None else args.workers
    steps = args.steps or 40
    cfg.data.num_workers = workers
    batch = cfg.train.batch_size // cfg.train.grad_accum
    steps_per_epoch(cfg)  # fails early with a clear message when the split is missing or too small
    jpegs = _first_jpegs(cfg, 256)
    sizes = [Image.open(io.BytesIO(d)).size for _, d in jpegs]
    print(f"bench data: {len(jpegs)} JPEGs from {cfg.data.root}/{cfg.data.train_split} "
          f"(median {int(np.median([s[0] for s in sizes]))}x{int(np.median([s[1] for s in sizes]))}), "
          f"crop {cfg.data.crop_size}, long side {cfg.data.long_side}, batch {batch}, {workers} workers, "
          f"{os.cpu_count()} CPUs")

    decode = decode_only_rate([d for _, d in jpegs])
    print(f"  decode only (PIL, 1 process):          {decode:8.1f} images/s")
    reps = max(1, (steps + 1) * batch // len(jpegs) + 1)
    decode_w = _loader_rate(DataLoader(_DecodeOnly(jpegs * reps), batch_size=batch, num_workers=workers),
                            batch, steps) if workers else decode
    print(f"  decode only (PIL, {workers} workers):          {decode_w:8.1f} images/s")
    pipeline = _loader_rate(_pipeline_batches(cfg), batch, steps)
    print(f"  vwe pipeline ({workers} workers):               {pipeline:8.1f} images/s")
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for key, data in jpegs:
            p = Path(tmp) / f"{key}.jpg"
            p.write_bytes(data)
            files.append(p)
        ds = Reader2021(files * reps, tuple(cfg.data.long_side), cfg.data.crop_size)
        base = _loader_rate(DataLoader(ds, batch_size=batch, num_workers=workers, shuffle=False, drop_last=True),
                            batch, steps)
    print(f"  2021-style per-file reader ({workers} workers): {base:8.1f} images/s")
    figures = {"workers": workers, "batch": batch, "crop_size": cfg.data.crop_size,
               "long_side": list(cfg.data.long_side), "images": len(jpegs), "cpus": os.cpu_count(),
               "decode_only_images_per_s": round(decode, 1),
               "decode_only_workers_images_per_s": round(decode_w, 1), "pipeline_images_per_s": round(pipeline, 1),
               "reader_2021_images_per_s": round(base, 1),
               "pipeline_over_decode": round(pipeline / decode, 3),
               "pipeline_over_decode_workers": round(pipeline / decode_w, 3), "pipeline_over_2021": round(pipeline / base, 3)}
    print(f"  pipeline / decode-only (1 process): {figures['pipeline_over_decode']:.2f}   "
          f"pipeline / decode-only ({workers} workers): {figures['pipeline_over_decode_workers']:.2f}   "
          f"pipeline / 2021 reader: {figures['pipeline_over_2021']:.2f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")
    return 0
