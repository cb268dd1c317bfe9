"""PASCAL VOC 2012 / SBD layout: class names, palette, split lists, label extraction from masks and XML."""
from __future__ import annotations

import io
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from vwe.formats.labels import voc_palette
from vwe.runtime.errors import DataError

CLASS_NAMES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)
NUM_CLASSES = 20
IGNORE_INDEX = 255
NUM_LABELS = NUM_CLASSES + 1  # label values: background 0, classes 1..20 (255 ignored)
_CLASS_INDEX = {name: i for i, name in enumerate(CLASS_NAMES)}


@dataclass(frozen=True)
class VocLayout:
    """Where the pieces of a VOC2012 folder are."""
    root: Path                       # the VOC2012 folder itself

    @property
    def images(self) -> Path:
        return self.root / "JPEGImages"

    @property
    def annotations(self) -> Path:
        return self.root / "Annotations"

    @property
    def seg_class(self) -> Path:
        return self.root / "SegmentationClass"

    @property
    def seg_class_aug(self) -> Path:
        return self.root / "SegmentationClassAug"

    @property
    def seg_lists(self) -> Path:
        return self.root / "ImageSets" / "Segmentation"


def find_voc(path: Path) -> VocLayout:
    """Accept the VOC2012 folder or a parent holding VOCdevkit/VOC2012 or VOC2012; say what was tried."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"VOC folder not found: {path}")
    tried = [path, path / "VOC2012", path / "VOCdevkit" / "VOC2012"]
    for cand in tried:
        if (cand / "JPEGImages").is_dir() and (cand / "ImageSets" / "Segmentation").is_dir():
            return VocLayout(cand)
    raise DataError(f"no VOC2012 data under {path}: looked for JPEGImages/ and ImageSets/Segmentation/ in "
                    + ", ".join(str(t) for t in tried))


def find_sbd(path: Path) -> Path:
    """Return SBD's dataset folder (holding cls/, img/, train.txt, val.txt) from benchmark_RELEASE or above."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"SBD folder not found: {path}")
    tried = [path, path / "dataset", path / "benchmark_RELEASE" / "dataset"]
    for cand in tried:
        if (cand / "cls").is_dir() and (cand / "train.txt").is_file():
            return cand
    raise DataError(f"no SBD data under {path}: looked for cls/ and train.txt in "
                    + ", ".join(str(t) for t in tried))


def read_id_list(path: Path) -> list[str]:
    """Image ids of a split list file (one per line; blank lines ignored); an id listed twice is refused
    (it would be trained on twice and its CAM written and scored twice)."""
    if not path.is_file():
        raise DataError(f"split list not found: {path}")
    first_line: dict[str, int] = {}
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        i = line.split()[0]
        if "." in i or "/" in i:
            raise DataError(f"{path}: image id {i!r} contains '.' or '/', which a shard key cannot hold")
        if i in first_line:
            raise DataError(f"{path}: image id {i!r} is listed twice, on lines {first_line[i]} and {lineno}")
        first_line[i] = lineno
    return list(first_line)


def labels_from_mask(mask: np.ndarray, where: str) -> list[int]:
    """Class indices 0..19 present in an index mask (0 = background, 255 = ignore)."""
    values = np.unique(mask)
    bad = [int(v) for v in values if v != IGNORE_INDEX and v > NUM_CLASSES]
    if bad:
        raise DataError(f"{where}: mask values {bad} are outside 0..{NUM_CLASSES} and {IGNORE_INDEX}")
    return [int(v) - 1 for v in values if 0 < v <= NUM_CLASSES]


def decode_mask(data: bytes, where: str) -> np.ndarray:
    """Decode an index PNG (palette 'P' or grey 'L') into a (H, W) uint8 array."""
    try:
        im = Image.open(io.BytesIO(data))
        im.load()
    except Exception as e:  # PIL raises several types for corrupt files
        raise DataError(f"{where}: cannot decode mask PNG: {e}") from None
    if im.mode not in ("P", "L"):
        raise DataError(f"{where}: mask must be an index PNG (mode P or L), got mode {im.mode}")
    return np.asarray(im, dtype=np.uint8)


def encode_mask(mask: np.ndarray) -> bytes:
    """Encode a (H, W) uint8 index mask as a palette PNG with the VOC colours."""
    im = Image.fromarray(mask.astype(np.uint8), mode="P")
    im.putpalette(voc_palette())
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def labels_from_xml(path: Path) -> list[int]:
    """Class indices of every object named in a VOC annotation file."""
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as e:
        raise DataError(f"{path}: cannot read annotation XML: {e}") from None
    labels = set()
    for obj in root.iter("object"):
        name = (obj.findtext("name") or "").strip()
        if name not in _CLASS_INDEX:
            raise DataError(f"{path}: unknown class name {name!r}")
        labels.add(_CLASS_INDEX[name])
    return sorted(labels)


def load_sbd_mask(path: Path) -> np.ndarray:
    """The class mask of an SBD cls/*.mat file (struct GTcls, field Segmentation) as (H, W) uint8."""
    import scipy.io
    try:
        mat = scipy.io.loadmat(str(path), squeeze_me=True, struct_as_record=False)
        seg = np.asarray(mat["GTcls"].Segmentation)
    except Exception as e:
        raise DataError(f"{path}: cannot read SBD GTcls.Segmentation: {e}") from None
    if seg.ndim != 2:
        raise DataError(f"{path}: GTcls.Segmentation must be 2-D, got shape {seg.shape}")
    return seg.astype(np.uint8)
