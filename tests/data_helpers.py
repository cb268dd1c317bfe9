"""Helpers for the data tests: small synthetic data sets and hand-made shards (real tar files)."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from vwe.formats.config import load_config
from vwe.runtime.files import file_sha256
from vwe.data.index import ShardInfo, load_index, write_index
from vwe.data.reading import iter_shard, read_shard
from vwe.data.voc import decode_mask

REPO = Path(__file__).resolve().parent.parent


def demo_cfg(root: Path, *overrides: str):
    """The demo config pointed at `root`, small and single-process unless overridden."""
    return load_config(REPO / "configs" / "demo.yaml",
                       [f"data.root={root}", "data.num_workers=0", "infer.num_workers=0",
                        "data.shuffle_buffer=8", "data.crop_size=48", "data.long_side=[40,64]",
                        "infer.scales=[1.0,0.5]", *overrides])


def samples_of(root: Path, split: str) -> list[dict]:
    """Every sample of a prepared split as {key, parts: {ext: bytes}} in index order."""
    idx = load_index(root, split)
    out = []
    for s in idx.shards:
        for raw in iter_shard(idx.path(s), s.count):
            parts = {"jpg": raw.jpg, "labels.json": json.dumps(raw.labels).encode()}
            if raw.mask is not None:
                parts["mask.png"] = raw.mask
            out.append({"key": raw.key, "parts": parts})
    return out


def write_split(root: Path, split: str, samples: list[dict], n_shards: int) -> list[Path]:
    """Write samples (dicts of key and {ext: bytes}) into n_shards tar files plus a valid index."""
    root.mkdir(parents=True, exist_ok=True)
    infos, paths = [], []
    n = len(samples)
    for i in range(n_shards):
        chunk = samples[i * n // n_shards:(i + 1) * n // n_shards]
        path = root / f"{split}-{i:06d}.tar"
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
            for s in chunk:
                for ext, data in s["parts"].items():
                    ti = tarfile.TarInfo(f"{s['key']}.{ext}")
                    ti.size = len(data)
                    tf.addfile(ti, io.BytesIO(data))
        infos.append(ShardInfo(path.name, len(chunk), file_sha256(path), path.stat().st_size,
                               tuple(s["key"] for s in chunk)))
        paths.append(path)
    write_index(root, split, infos, has_masks=all("mask.png" in s["parts"] for s in samples))
    return paths


def label_folder(shards, split, folder, bump: int = 0):
    """One L-mode PNG per sample of `split`: its ground-truth mask (+bump, mod 21 outside 255)."""
    folder.mkdir(parents=True, exist_ok=True)
    idx = load_index(shards, split)
    labels = {}
    for shard in idx.shards:
        for raw in read_shard(idx, shard):
            m = decode_mask(bytes(raw.mask), raw.key)
            m = np.where(m == 255, 255, (m.astype(int) + bump) % 21).astype(np.uint8)
            Image.fromarray(m, mode="L").save(folder / f"{raw.key}.png")
            labels[raw.key] = m
    return labels
