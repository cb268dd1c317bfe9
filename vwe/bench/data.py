"""`vwe bench data`: images/s of the training loader, of JPEG decoding alone, and of the published code's reader;
and how each `data.resize` mode compares with PIL's bicubic resize (accuracy and speed).

All three work on the same images: the first samples of the training split's shards. The published code's
reader is what the published code did per file: PIL decode, PIL resize, float32 NumPy normalisation and
crop, in a map-style Dataset with the same number of DataLoader workers.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from vwe.data.loader import train_batches
from vwe.data.index import load_index
from vwe.data.reading import read_shard
from vwe.data.transforms import IMAGENET_MEAN, IMAGENET_STD, RESIZE_MODES, resize_uint8, scaled_size, to_tensor
from vwe.runtime.files import atomic_write


def _first_jpegs(cfg, n: int) -> list[tuple[str, bytes]]:
    idx = load_index(cfg.data.root, cfg.data.train_split)
    out: list[tuple[str, bytes]] = []
    for s in idx.shards:
        for raw in read_shard(idx, s):
            out.append((raw.key, raw.jpg))
            if len(out) == n:
                return out
    return out


def decode_only_rate(jpegs: list[bytes], min_seconds: float = 1.0) -> tuple[float, int]:
    """(full-resolution RGB decodes per second in this process, decodes done): the floor of any
    JPEG loader."""
    n, t0 = 0, time.perf_counter()
    while True:
        for data in jpegs:
            im = Image.open(io.BytesIO(data))
            im.load()
            if im.mode != "RGB":
                im = im.convert("RGB")
            n += 1
        if time.perf_counter() - t0 >= min_seconds:
            return n / (time.perf_counter() - t0), n


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
    """Per-file reader as in the published code: decode, random long-side resize, flip, normalise, crop."""

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


def resize_figures(jpegs: list[bytes], targets: list[tuple[str, float | int]]) -> dict[str, float]:
    """How `data.resize` compares with PIL's BICUBIC (the published code's resize) on these photos: per
    mode, the mean absolute difference in grey levels (and the largest) over all targets, and ms per
    resize on one thread for torch's bicubic and bilinear and for PIL. A target is ("long", side) or
    ("scale", factor); sizes are rounded as the loaders round them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    diff = {m: [] for m in RESIZE_MODES}
    worst = {m: 0 for m in RESIZE_MODES}
    secs = {m: 0.0 for m in (*RESIZE_MODES, "pil")}
    try:
        for data in jpegs:
            im = Image.open(io.BytesIO(data)).convert("RGB")
            w, h = im.size
            x = to_tensor(im)
            for kind, value in targets:
                size = scaled_size(w, h, value / max(w, h) if kind == "long" else value)
                t0 = time.perf_counter()
                ref = np.asarray(im.resize((size[1], size[0]), Image.BICUBIC)).astype(np.int16)
                secs["pil"] += time.perf_counter() - t0
                for m in RESIZE_MODES:
                    t0 = time.perf_counter()
                    got = resize_uint8(x, size, m)[0].permute(1, 2, 0).numpy().astype(np.int16)
                    secs[m] += time.perf_counter() - t0
                    d = np.abs(got - ref)
                    diff[m].append(float(d.mean()))
                    worst[m] = max(worst[m], int(d.max()))
    finally:
        torch.set_num_threads(threads)
    n = len(jpegs) * len(targets)
    out = {}
    for m in RESIZE_MODES:
        out[f"resize_{m}_vs_pil_bicubic_mean_abs"] = round(float(np.mean(diff[m])), 4)
        out[f"resize_{m}_vs_pil_bicubic_max_abs"] = worst[m]
        out[f"resize_{m}_ms"] = round(1000.0 * secs[m] / n, 3)
    out["resize_pil_bicubic_ms"] = round(1000.0 * secs["pil"] / n, 3)
    return out


def _cpu_s() -> float:
    """CPU seconds of this process plus its reaped children (loader workers, once shut down)."""
    ch = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + ch.ru_utime + ch.ru_stime


def _count(b) -> int:
    if isinstance(b, dict):
        return len(b["key"] if "key" in b else b["name"])
    return len(b)


def _loader_rate(batches, n_batches: int) -> tuple[float, float]:
    """(images/s over n_batches after the first, CPU ms per image over all of them).

    Wall-clock rate excludes worker start-up and the first fetch. The CPU figure counts every process
    involved (workers are shut down and reaped before it is read), start-up included, so it is little
    affected by other load on the machine."""
    cpu0 = _cpu_s()
    it = iter(batches)
    n_all = _count(next(it))
    t0, n = time.perf_counter(), 0
    for _ in range(n_batches):
        n += _count(next(it))
    rate = n / (time.perf_counter() - t0)
    close = getattr(it, "close", None) or getattr(it, "_shutdown_workers", None)
    if close is not None:
        close()
    del it
    return rate, 1000.0 * (_cpu_s() - cpu0) / (n_all + n)


def _stream(cfg):
    """The training loader as the Trainer runs it: from epoch 0 on, without end."""
    return train_batches(cfg.data, cfg.train, 0, 1, 0, epochs=None)


def _with(cfg, **data_fields):
    """A copy of cfg with some data.* fields replaced."""
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **data_fields))


def run(cfg, args) -> int:
    """Print (and with --json write) the rates, CPU cost per image and the ratios."""
    workers = cfg.data.num_workers if args.workers is None else args.workers
    cfg = _with(cfg, num_workers=workers, worker_kind="process")
    batch = cfg.train.batch_size // cfg.train.grad_accum
    steps = args.steps or 40  # over epoch ends too: training's stream goes on with the same workers
    jpegs = _first_jpegs(cfg, 256)
    sizes = [Image.open(io.BytesIO(d)).size for _, d in jpegs]
    print(f"bench data: {len(jpegs)} JPEGs from {cfg.data.root}/{cfg.data.train_split} "
          f"(median {int(np.median([s[0] for s in sizes]))}x{int(np.median([s[1] for s in sizes]))}), "
          f"crop {cfg.data.crop_size}, long side {cfg.data.long_side}, batch {batch}, {workers} workers, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    reps = max(1, (steps + 1) * batch // len(jpegs) + 1)
    res: dict[str, tuple[float, float]] = {}

    def keep(key: str, rate_cpu: tuple[float, float]) -> None:
        old = res.get(key, (0.0, float("inf")))
        res[key] = (max(old[0], rate_cpu[0]), min(old[1], rate_cpu[1]))

    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for key, data in jpegs:
            p = Path(tmp) / f"{key}.jpg"
            atomic_write(p, data)
            files.append(p)
        # two interleaved rounds, best of each: other load on the machine skews single measurements
        for _ in range(2):
            c0 = time.process_time()
            decode, n = decode_only_rate([d for _, d in jpegs])
            keep("decode_only_1proc", (decode, 1000.0 * (time.process_time() - c0) / n))
            keep("decode_only_workers", _loader_rate(
                DataLoader(_DecodeOnly(jpegs * reps), batch_size=batch, num_workers=workers), steps))
            keep("loader_processes", _loader_rate(_stream(cfg), steps))
            keep("loader_threads", _loader_rate(_stream(_with(cfg, worker_kind="thread")), steps))
            ds = Reader2021(files * reps, tuple(cfg.data.long_side), cfg.data.crop_size)
            keep("reader_2021", _loader_rate(
                DataLoader(ds, batch_size=batch, num_workers=workers, shuffle=False, drop_last=True),
                max(2, steps // 4)))
    decode = res["decode_only_1proc"][0]
    labels = {"decode_only_1proc": "decode only (PIL, 1 process)",
              "decode_only_workers": f"decode only (PIL, {workers} workers)",
              "loader_processes": f"vwe loader ({workers} worker processes)",
              "loader_threads": f"vwe loader ({workers} worker threads)",
              "reader_2021": f"published code's per-file reader ({workers} workers)"}
    for k, (rate, cpu) in res.items():
        cpu_text = f"{cpu:6.2f} CPU-ms/image"
        print(f"  {labels[k]:<44} {rate:8.1f} images/s  {cpu_text}")
    pipe, pipe_cpu = max(res["loader_processes"], res["loader_threads"])
    base, base_cpu = res["reader_2021"]
    figures = {"workers": workers, "batch": batch, "crop_size": cfg.data.crop_size,
               "long_side": list(cfg.data.long_side), "images": len(jpegs), "cpus": os.cpu_count(),
               "load_average": round(os.getloadavg()[0], 2),
               **{f"{k}_images_per_s": round(v[0], 1) for k, v in res.items()},
               **{f"{k}_cpu_ms_per_image": round(v[1], 3) for k, v in res.items()},
               "loader_best": "threads" if res["loader_threads"][0] > res["loader_processes"][0] else "processes",
               "loader_over_decode_1proc": round(pipe / decode, 3),
               "loader_over_decode_workers": round(pipe / res["decode_only_workers"][0], 3),
               "loader_over_2021": round(pipe / base, 3),
               "loader_over_2021_cpu": round(base_cpu / pipe_cpu, 3)}
    print(f"  best loader ({figures['loader_best']}) / decode-only: "
          f"{figures['loader_over_decode_1proc']:.2f} (1 process), "
          f"{figures['loader_over_decode_workers']:.2f} ({workers} workers);  loader / 2021 reader: "
          f"{figures['loader_over_2021']:.2f} (images/s), {figures['loader_over_2021_cpu']:.2f} (CPU per image)")
    targets = [("long", v) for v in cfg.data.long_side] + [("scale", f) for f in cfg.infer.scales if f != 1.0]
    figures.update(resize_figures([d for _, d in jpegs[:32]], targets))
    print(f"  resize vs PIL BICUBIC ({min(32, len(jpegs))} images; long side {list(cfg.data.long_side)}, "
          f"scales {[f for f in cfg.infer.scales if f != 1.0]}): " + ", ".join(
              f"{m} {figures[f'resize_{m}_vs_pil_bicubic_mean_abs']:.3f} grey levels mean "
              f"(max {figures[f'resize_{m}_vs_pil_bicubic_max_abs']}), {figures[f'resize_{m}_ms']:.2f} ms"
              for m in RESIZE_MODES) + f"; PIL {figures['resize_pil_bicubic_ms']:.2f} ms (1 thread)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(Path(args.json), json.dumps(figures, indent=1) + "\n")
    return 0
