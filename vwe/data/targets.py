"""Segmentation splits: a split's images paired with a folder of label PNGs (`vwe prepare --labels-from`).

The pseudo labels of `vwe refine` or of the random walk, an outside tool's label folder, or the ground
truth (for an upper-bound run) become a split the segmentation stage streams like any other: the same
shards (the source split's JPEG, image labels and mask unchanged, plus `{key}.target.png`), the same
index with SHA-256 per shard, and `targets` in the index saying where the labels came from. Every
problem of the folder is named before anything is written: ids without a label, labels for ids the
split does not have, sizes that differ from the image, values outside 0..20 and 255.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from vwe.data import voc as vocdata
from vwe.data.index import SPLITS, index_path, is_remote, load_index, write_index
from vwe.data.prepare import jpeg_size, write_shard
from vwe.data.reading import RawSample, read_shard
from vwe.runtime.errors import DataError, problem_list

IGNORED_FILES = ("report.json", "report.md")  # written by refine beside its PNGs; not labels


def label_files(folder: Path) -> dict[str, Path]:
    """The label PNGs of a folder by id (`<id>.png`; subfolders such as refine's color/ are not read)."""
    if not folder.is_dir():
        raise DataError(f"label folder {folder} not found (--labels-from)")
    return {p.stem: p for p in sorted(folder.glob("*.png")) if p.is_file()}


def check_target(data: bytes, size: tuple[int, int], where: str) -> np.ndarray:
    """Decode a label PNG and check it against its image's (width, height) and the label values."""
    label = vocdata.decode_mask(data, where)
    w, h = size
    if label.shape != (h, w):
        raise DataError(f"{where}: label is {label.shape[1]}x{label.shape[0]} but the image is {w}x{h}")
    bad = (label > vocdata.NUM_CLASSES) & (label != vocdata.IGNORE_INDEX)
    if bad.any():
        y, x = (int(v) for v in np.argwhere(bad)[0])
        values = sorted(int(v) for v in np.unique(label[bad]))
        raise DataError(f"{where}: label values {values} are outside 0..{vocdata.NUM_CLASSES} and "
                        f"{vocdata.IGNORE_INDEX} (first at y={y}, x={x})")
    return label


def prepare_targets(root: Path, source_split: str, split: str, labels_dir: Path, shard_size: int = 1000,
                    max_listed: int = 20, source_root: str | Path | None = None) -> Path:
    """Write split `split` under the local data root `root`: every sample of `source_split` (in
    `source_root`, default `root`) with its label PNG from `labels_dir`; returns the new index. DataError
    listing every problem, before any write."""
    if shard_size < 1:
        raise DataError(f"shard size must be >= 1, got {shard_size}")
    if is_remote(root):
        raise DataError(f"--out {root}: a segmentation split is written into a local data folder")
    same_root = source_root is None or str(source_root) == str(root)
    if same_root and (split in SPLITS or split == source_split):
        raise DataError(f"--split {split!r}: name the new split something other than the splits `vwe prepare` "
                        f"writes ({', '.join(SPLITS)}) and its source, e.g. {source_split}_pseudo")
    index = load_index(root if source_root is None else source_root, source_split)
    files = label_files(Path(labels_dir))
    keys = index.keys
    problems = [f"image {k!r} of split '{source_split}': no label {Path(labels_dir) / (k + '.png')}"
                for k in keys if k not in files]
    extra = sorted(set(files) - set(keys) - {Path(n).stem for n in IGNORED_FILES})
    problems += [f"label {files[k]}: no image {k!r} in split '{source_split}'" for k in extra]
    if not problems:
        problems = list(_check_all(index, files))
    if problems:
        raise DataError(problem_list(f"--labels-from {labels_dir}: {len(problems)} problem(s) pairing it with "
                                     f"split '{source_split}' ({index_path(index.root, source_split)})",
                                     problems, max_listed))
    Path(root).mkdir(parents=True, exist_ok=True)
    infos, rewritten, batch = [], 0, []
    for shard in index.shards:
        for raw in read_shard(index, shard):
            batch.append(RawSample("", raw.key, bytes(raw.jpg), raw.labels,
                                   None if raw.mask is None else bytes(raw.mask), target=files[raw.key].read_bytes()))
            if len(batch) == shard_size:
                rewritten += _flush(root, split, batch, infos)
    if batch:
        rewritten += _flush(root, split, batch, infos)
    path = write_index(root, split, infos, has_masks=index.has_masks, labels=index.labels,
                       targets={"from": str(Path(labels_dir).resolve()), "source_split": source_split,
                                "count": len(keys)})
    listed = {s.name for s in infos}
    for old in Path(root).glob(f"{split}-*.tar"):
        if old.name not in listed:
            old.unlink()
    print(f"prepare: {split}: {len(keys)} samples of '{source_split}' with labels from {labels_dir} in "
          f"{len(infos)} shards ({rewritten} written, {len(infos) - rewritten} kept identical) -> {path}")
    return path


def _check_all(index, files: dict[str, Path]):
    """Problems of the label files against the images (sizes, values): one message per bad file."""
    for shard in index.shards:
        for raw in read_shard(index, shard):
            if raw.error is not None:
                yield raw.error
                continue
            path = files[raw.key]
            try:
                check_target(path.read_bytes(), jpeg_size(bytes(raw.jpg), f"shard {shard.name}, sample {raw.key!r}"),
                             str(path))
            except DataError as e:
                yield str(e)


def _flush(root: Path, split: str, batch: list[RawSample], infos: list) -> int:
    info, new = write_shard(Path(root) / f"{split}-{len(infos):06d}.tar", batch)
    infos.append(info)
    batch.clear()
    return int(new)
