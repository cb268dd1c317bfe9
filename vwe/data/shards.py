"""Webdataset shards: writing them from VOCdevkit (+SBD), their index, checksums and reading them back.

A shard `{split}-{NNNNNN}.tar` holds, per sample (key = image id, in split-list order):
    {key}.jpg          the original JPEG bytes, never re-encoded
    {key}.labels.json  JSON list of class indices 0..19 present in the image, e.g. [6, 14]
    {key}.mask.png     the index mask PNG (0 = background, c+1 = class c, 255 = ignore), when one exists
The index `{split}.json` lists the shards with sample count, byte size, SHA-256 and keys, plus the
class names. Tar headers are fixed (mtime 0, uid/gid 0, mode 0444), so the same input gives the same
bytes and a re-run can keep identical shards untouched.
"""
from __future__ import annotations

import hashlib
import io
import json
import mmap
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Iterator

from PIL import Image

from vwe.data import voc as vocdata
from vwe.errors import DataError
from vwe.io import atomic_write, file_sha256

INDEX_VERSION = 1
SPLITS = ("train_aug", "train", "val")
EXT_IMAGE, EXT_LABELS, EXT_MASK = "jpg", "labels.json", "mask.png"


@dataclass(frozen=True)
class ShardInfo:
    name: str
    count: int
    sha256: str
    bytes: int
    keys: tuple[str, ...]


@dataclass(frozen=True)
class SplitIndex:
    root: Path
    split: str
    shards: tuple[ShardInfo, ...]
    class_names: tuple[str, ...]
    has_masks: bool
    labels: dict | None = None       # where the image labels came from (prepare's record), if known

    @property
    def num_samples(self) -> int:
        return sum(s.count for s in self.shards)

    @property
    def keys(self) -> list[str]:
        return [k for s in self.shards for k in s.keys]

    def path(self, shard: ShardInfo) -> Path:
        return self.root / shard.name


@dataclass
class RawSample:
    """One sample as stored; `error` is set (and the rest may be missing) when the sample is bad."""
    shard: str
    key: str
    jpg: bytes | memoryview | None = None
    labels: list[int] = field(default_factory=list)
    mask: bytes | memoryview | None = None
    error: str | None = None


# ---------------------------------------------------------------- index

def index_path(root: Path, split: str) -> Path:
    return Path(root) / f"{split}.json"


def load_index(root: str | os.PathLike, split: str) -> SplitIndex:
    """Read and check `{root}/{split}.json`."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder not found: {root} (set data.root, or run `vwe prepare --out {root}`)")
    p = index_path(root, split)
    if not p.is_file():
        have = sorted(q.stem for q in root.glob("*.json"))
        raise DataError(f"no index for split '{split}': {p} is missing (splits here: {', '.join(have) or 'none'};"
                        f" run `vwe prepare`)")
    try:
        d = json.loads(p.read_text())
        shards = tuple(ShardInfo(s["name"], int(s["count"]), s["sha256"], int(s["bytes"]), tuple(s["keys"]))
                       for s in d["shards"])
        idx = SplitIndex(root, d["split"], shards, tuple(d["class_names"]), bool(d["has_masks"]),
                         d.get("labels"))
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{p}: not a valid shard index ({type(e).__name__}: {e})") from None
    for s in shards:
        check_shard_name(s.name, str(p))
    if len(idx.class_names) != vocdata.NUM_CLASSES:
        raise DataError(f"{p}: {len(idx.class_names)} class names, expected {vocdata.NUM_CLASSES}")
    for s in shards:
        if len(s.keys) != s.count:
            raise DataError(f"{p}: shard {s.name} lists {len(s.keys)} keys but count {s.count}")
    return idx


def check_shard_name(name: str, index: str) -> None:
    """A shard named by an index must lie in the index's folder: a relative path without `..`
    (and not a URL or pipe: command of its own)."""
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if (not name or name.startswith(("/", "\\")) or PureWindowsPath(name).drive or ".." in parts
            or re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:", name)):
        raise DataError(f"{index}: shard entry {name!r} names a file outside the index's folder "
                        f"(shard names must be relative paths without '..')")


def write_index(root: Path, split: str, shards: list[ShardInfo], has_masks: bool,
                labels: dict | None = None) -> Path:
    """Write `{root}/{split}.json`; `labels` records where the image labels came from."""
    d = {"version": INDEX_VERSION, "split": split, "num_samples": sum(s.count for s in shards),
         "class_names": list(vocdata.CLASS_NAMES), "has_masks": has_masks,
         **({"labels": labels} if labels is not None else {}),
         "sample_format": {"image": EXT_IMAGE, "labels": EXT_LABELS, "mask": EXT_MASK},
         "shards": [{"name": s.name, "count": s.count, "bytes": s.bytes, "sha256": s.sha256,
                     "keys": list(s.keys)} for s in shards]}
    p = index_path(root, split)
    atomic_write(p, (json.dumps(d, indent=1) + "\n").encode())
    return p


# ---------------------------------------------------------------- checksums

_VERIFIED: dict[tuple[str, int, int], str] = {}


def verify_shards(index: SplitIndex, shards: list[ShardInfo] | None = None) -> None:
    """Check that each shard exists with its indexed size and SHA-256 (cached per process by mtime/size)."""
    for s in shards if shards is not None else index.shards:
        p = index.path(s)
        if not p.is_file():
            raise DataError(f"shard {p} listed in {index_path(index.root, index.split)} is missing")
        st = p.stat()
        if st.st_size != s.bytes:
            raise DataError(f"shard {p}: {st.st_size} bytes, its index says {s.bytes} (truncated or replaced?)")
        ck = (str(p), st.st_size, st.st_mtime_ns)
        if _VERIFIED.get(ck) == s.sha256:
            continue
        digest = file_sha256(p)
        if digest != s.sha256:
            raise DataError(f"shard {p}: SHA-256 {digest[:16]}... does not match its index ({s.sha256[:16]}...)")
        _VERIFIED[ck] = digest


# ---------------------------------------------------------------- reading

def _check_labels(raw: bytes, where: str) -> list[int]:
    try:
        labels = json.loads(bytes(raw))
    except ValueError as e:
        raise DataError(f"{where}: {EXT_LABELS} is not JSON: {e}") from None
    if not isinstance(labels, list) or not all(isinstance(c, int) and not isinstance(c, bool) for c in labels):
        raise DataError(f"{where}: {EXT_LABELS} must be a list of class indices, got {labels!r}")
    bad = [c for c in labels if not 0 <= c < vocdata.NUM_CLASSES]
    if bad:
        raise DataError(f"{where}: label index {bad[0]} out of range 0..{vocdata.NUM_CLASSES - 1}")
    return labels


def _finish(shard: str, key: str, parts: dict[str, bytes]) -> RawSample:
    where = f"shard {shard}, sample {key!r}"
    s = RawSample(shard, key, parts.get(EXT_IMAGE), mask=parts.get(EXT_MASK))
    if s.jpg is None:
        s.error = f"{where}: no image ({key}.{EXT_IMAGE}) in the shard"
    elif EXT_LABELS not in parts:
        s.error = f"{where}: no labels ({key}.{EXT_LABELS}) in the shard"
    else:
        try:
            s.labels = _check_labels(parts[EXT_LABELS], where)
        except DataError as e:
            s.error = str(e)
    return s


_ZERO_BLOCK = bytes(512)


def _octal(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:          # GNU base-256 for large sizes
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _pax_path(data: bytes) -> str | None:
    for rec in data.decode("utf-8", "replace").split("\n"):
        _, _, kv = rec.partition(" ")
        if kv.startswith("path="):
            return kv[5:]
    return None


def _tar_members(mm, where: str) -> Iterator[tuple[str, int, int]]:
    """(name, data offset, size) of each regular file in a tar held in a buffer; a cut or corrupt
    archive raises DataError. A small ustar/GNU/pax reader: it keeps the data in place (mmap) so loader
    workers can skip the samples they do not decode without reading them."""
    off, n, long_name = 0, len(mm), None
    while True:
        if off + 512 > n:
            raise DataError(f"{where}: truncated tar (archive cut inside a header or before its end marker)")
        hdr = bytes(mm[off:off + 512])
        if hdr == _ZERO_BLOCK:
            return
        stored = _octal(hdr[148:156])
        if stored != sum(hdr[:148]) + 256 + sum(hdr[156:]):
            raise DataError(f"{where}: corrupt tar header at byte {off} (checksum mismatch)")
        size, flag = _octal(hdr[124:136]), hdr[156:157]
        start = off + 512
        if start + size > n:
            raise DataError(f"{where}: truncated tar (member at byte {off} needs {size} bytes, "
                            f"{n - start} left)")
        off = start + (size + 511) // 512 * 512
        if flag == b"L":
            long_name = bytes(mm[start:start + size]).split(b"\0", 1)[0].decode()
            continue
        if flag in (b"x", b"g"):
            if flag == b"x":
                long_name = _pax_path(bytes(mm[start:start + size])) or long_name
            continue
        name = hdr[:100].split(b"\0", 1)[0].decode()
        if hdr[257:262] == b"ustar" and hdr[345:500].strip(b"\0"):
            name = hdr[345:500].split(b"\0", 1)[0].decode() + "/" + name
        if long_name is not None:
            name, long_name = long_name, None
        if flag in (b"0", b"\0", b"7"):
            yield name, start, size


def iter_shard(path: Path, expected: int | None = None) -> Iterator[RawSample]:
    """Samples of one shard in stored order. Bad samples come with `error` set (the caller decides);
    a shard that is missing, empty, truncated or unreadable raises DataError naming it.

    `jpg` and `mask` are zero-copy memoryviews into the memory-mapped shard (they compare equal to
    bytes; `bytes(...)` copies them)."""
    path = Path(path)
    name = path.name
    if not path.is_file():
        raise DataError(f"shard {path} is missing")
    if path.stat().st_size == 0:
        raise DataError(f"shard {path} is empty (0 bytes)")
    try:
        with open(path, "rb") as f:
            mm = memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
    except OSError as e:
        raise DataError(f"shard {path}: cannot read: {e}") from None
    n = 0
    key, parts = None, {}
    last = None
    try:
        for member, start, size in _tar_members(mm, f"shard {path}"):
            k, _, ext = member.rsplit("/", 1)[-1].partition(".")
            if k != key:
                if key is not None:
                    n += 1
                    last = key
                    yield _finish(name, key, parts)
                key, parts = k, {}
            parts[ext] = mm[start:start + size]
    except DataError as e:
        raise DataError(f"{e}; last complete sample {last!r}, cut in sample {key!r}") from None
    if key is not None:
        n += 1
        yield _finish(name, key, parts)
    if n == 0:
        raise DataError(f"shard {path} holds no samples (empty tar)")
    if expected is not None and n != expected:
        raise DataError(f"shard {path}: {n} samples read but its index says {expected} "
                        f"(last sample {key!r}; truncated?)")


# ---------------------------------------------------------------- writing

def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = size, 0, 0o444, 0, 0, "", ""
    return ti


def write_shard(path: Path, samples: list[RawSample]) -> tuple[ShardInfo, bool]:
    """Write samples into a tar atomically; keep an existing identical file. Returns (info, rewritten)."""
    path = Path(path)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for s in samples:
            members = [(EXT_IMAGE, s.jpg), (EXT_LABELS, json.dumps(sorted(s.labels)).encode())]
            if s.mask is not None:
                members.append((EXT_MASK, s.mask))
            for ext, data in members:
                tf.addfile(_tarinfo(f"{s.key}.{ext}", len(data)), io.BytesIO(data))
    data = buf.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    info = ShardInfo(path.name, len(samples), digest, len(data), tuple(s.key for s in samples))
    if path.is_file() and path.stat().st_size == len(data) and file_sha256(path) == digest:
        return info, False
    atomic_write(path, data)
    return info, True


def _jpeg_size(data: bytes, where: str) -> tuple[int, int]:
    """(width, height) of a JPEG after checking it decodes (at 1/8 scale: fast, reads all the data)."""
    try:
        im = Image.open(io.BytesIO(data))
        if im.format != "JPEG":
            raise DataError(f"{where}: not a JPEG (format {im.format})")
        size = im.size
        im.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))
        im.load()
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{where}: cannot decode JPEG: {e}") from None
    return size


LABEL_SOURCES = ("xml", "mask")


class _Source:
    """Finds image, mask and labels for an id in VOC (+SBD) folders.

    Image labels come from `labels` first ("xml": the VOC annotation, every object including difficult
    ones, as the published code's cls_labels.npy; "mask": the classes present in the mask) and from the
    other where that file is missing; `counts` tallies which one each image used."""

    def __init__(self, layout: vocdata.VocLayout, sbd_dir: Path | None, labels: str = "xml"):
        if labels not in LABEL_SOURCES:
            raise DataError(f"label source must be one of {', '.join(LABEL_SOURCES)}, got {labels!r}")
        self.layout, self.sbd_dir, self.labels = layout, sbd_dir, labels
        self.counts = {"xml": 0, "mask": 0}

    def sample(self, image_id: str) -> RawSample:
        lay = self.layout
        jpg_path = lay.images / f"{image_id}.jpg"
        if not jpg_path.is_file() and self.sbd_dir is not None and (self.sbd_dir / "img" / f"{image_id}.jpg").is_file():
            jpg_path = self.sbd_dir / "img" / f"{image_id}.jpg"
        if not jpg_path.is_file():
            raise DataError(f"image {image_id!r}: {lay.images / (image_id + '.jpg')} not found")
        jpg = jpg_path.read_bytes()
        w, h = _jpeg_size(jpg, str(jpg_path))
        mask, mask_src, mask_labels = None, None, None
        for cand in (lay.seg_class / f"{image_id}.png",
                     self.sbd_dir / "cls" / f"{image_id}.mat" if self.sbd_dir else None,
                     lay.seg_class_aug / f"{image_id}.png"):
            if cand is not None and cand.is_file():
                mask_src = cand
                break
        if mask_src is not None:
            if mask_src.suffix == ".mat":
                arr = vocdata.load_sbd_mask(mask_src)
                mask = vocdata.encode_mask(arr)
            else:
                mask = mask_src.read_bytes()
                arr = vocdata.decode_mask(mask, str(mask_src))
            if arr.shape != (h, w):
                raise DataError(f"{mask_src}: mask is {arr.shape[1]}x{arr.shape[0]} but image {jpg_path} is {w}x{h}")
            mask_labels = vocdata.labels_from_mask(arr, str(mask_src))
        xml = lay.annotations / f"{image_id}.xml"
        use = self.labels
        if use == "xml" and not xml.is_file():
            use = "mask"
        elif use == "mask" and mask_labels is None:
            use = "xml"
        if use == "mask" and mask_labels is None or use == "xml" and not xml.is_file():
            raise DataError(f"image {image_id!r}: no annotation {xml} and no mask (SegmentationClass, SBD, "
                            f"SegmentationClassAug)")
        labels = vocdata.labels_from_xml(xml) if use == "xml" else mask_labels
        self.counts[use] += 1
        return RawSample("", image_id, jpg, labels, mask)


def split_ids(layout: vocdata.VocLayout, sbd_dir: Path | None) -> dict[str, list[str]]:
    """Image ids per split; train_aug = SBD train + SBD val + VOC train - VOC val (VOC train without SBD)."""
    train = vocdata.read_id_list(layout.seg_lists / "train.txt")
    val = vocdata.read_id_list(layout.seg_lists / "val.txt")
    if sbd_dir is None:
        aug = list(train)
    else:
        pool = set(vocdata.read_id_list(sbd_dir / "train.txt")) | set(vocdata.read_id_list(sbd_dir / "val.txt")) | set(train)
        aug = sorted(pool - set(val))
    return {"train_aug": aug, "train": train, "val": val}


def prepare(voc: Path, sbd: Path | None, out: Path, shard_size: int = 1000, labels: str = "xml") -> None:
    """Convert VOC2012 (+SBD) into shards and an index per split under `out`; image labels from the
    XML annotations (`labels="xml"`, as the published code) or from the masks (`"mask"`), each falling
    back to the other where its file is missing."""
    if shard_size < 1:
        raise DataError(f"shard size must be >= 1, got {shard_size}")
    if labels not in LABEL_SOURCES:
        raise DataError(f"label source must be one of {', '.join(LABEL_SOURCES)}, got {labels!r}")
    layout = vocdata.find_voc(Path(voc))
    print(f"prepare: VOC2012 data found at {layout.root}")
    sbd_dir = vocdata.find_sbd(Path(sbd)) if sbd is not None else None
    if sbd_dir is not None:
        print(f"prepare: SBD data found at {sbd_dir}")
    else:
        print("prepare: no SBD given: train_aug = VOC train only")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".*.tar.tmp*"):
        stale.unlink()
    for split, ids in split_ids(layout, sbd_dir).items():
        if not ids:
            raise DataError(f"split '{split}' is empty")
        source = _Source(layout, sbd_dir, labels)
        infos, rewritten, with_mask = [], 0, 0
        for i in range(0, len(ids), shard_size):
            samples = [source.sample(k) for k in ids[i:i + shard_size]]
            with_mask += sum(s.mask is not None for s in samples)
            info, new = write_shard(out / f"{split}-{i // shard_size:06d}.tar", samples)
            infos.append(info)
            rewritten += new
        other = "mask" if labels == "xml" else "xml"
        label_info = {"source": labels, "fallback": other, "images_from_fallback": source.counts[other]}
        write_index(out, split, infos, has_masks=with_mask == len(ids), labels=label_info)
        listed = {s.name for s in infos}
        for old in out.glob(f"{split}-*.tar"):
            if old.name not in listed:
                old.unlink()
        print(f"prepare: {split}: {len(ids)} samples ({with_mask} with masks; labels from {labels}, "
              f"{source.counts[other]} from the {other} fallback) in {len(infos)} shards "
              f"({rewritten} written, {len(infos) - rewritten} kept identical) -> {index_path(out, split)}")
