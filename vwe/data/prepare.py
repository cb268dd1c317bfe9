"""Writing shards: VOCdevkit (+SBD) to shards and an index per split (`vwe prepare`).

Tar headers are fixed (mtime 0, uid/gid 0, mode 0444), so the same input gives the same bytes and a
re-run keeps identical shards untouched. The shards are plain webdataset shards (docs/data.md).
"""

import hashlib
import io
import json
import tarfile
from pathlib import Path

from PIL import Image

from vwe.data import voc as vocdata
from vwe.data.index import EXT_IMAGE, EXT_LABELS, EXT_MASK, EXT_TARGET, ShardInfo, index_path, write_index
from vwe.data.reading import RawSample
from vwe.runtime.errors import DataError
from vwe.runtime.files import atomic_write, file_sha256

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
            if s.target is not None:
                members.append((EXT_TARGET, s.target))
            for ext, data in members:
                tf.addfile(_tarinfo(f"{s.key}.{ext}", len(data)), io.BytesIO(data))
    data = buf.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    info = ShardInfo(path.name, len(samples), digest, len(data), tuple(s.key for s in samples))
    if path.is_file() and path.stat().st_size == len(data) and file_sha256(path) == digest:
        return info, False
    atomic_write(path, data)
    return info, True


def jpeg_size(data: bytes, where: str) -> tuple[int, int]:
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
        w, h = jpeg_size(jpg, str(jpg_path))
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
