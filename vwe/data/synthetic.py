"""Procedural VOC-like scenes with exact masks, written in the VOCdevkit (and optionally SBD) layout.

Every object has a body of one shared appearance (grey with fine diagonal stripes, the same for all
classes) carrying a small class-specific patch (a saturated class colour with class-oriented stripes).
The class can be told from the patch alone while the mask covers the whole body: the situation in
which plain CAMs light up only the discriminative part.
"""
from __future__ import annotations

import functools
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
from PIL import Image
from scipy import ndimage

from vwe.runtime.errors import DataError
from vwe.runtime.files import atomic_write
from vwe.runtime.parallel import usable_cores
from vwe.data.voc import CLASS_NAMES, IGNORE_INDEX, encode_mask

# Default classes (VOC indices): aeroplane, bus, cat, dog, person. Few and clearly coloured, so a small
# network trained from scratch on a CPU for a few minutes learns them.
DEFAULT_CLASSES: tuple[int, ...] = (0, 5, 7, 11, 14)
# Saturated patch colours, one per used class (cycled when more classes are asked for).
_PATCH_COLOURS = np.array([(230, 30, 30), (30, 200, 40), (40, 70, 240), (240, 220, 20), (220, 40, 220),
                           (20, 210, 220), (250, 140, 10), (130, 60, 10)], dtype=np.float32)


@dataclass
class Scene:
    image: np.ndarray           # (H, W, 3) uint8
    mask: np.ndarray            # (H, W) uint8 class index mask with 255 on object borders (VOC style)
    mask_sbd: np.ndarray        # (H, W) uint8 class index mask without borders (SBD style)
    objects: list[tuple[int, tuple[int, int, int, int]]]  # (class index, (xmin, ymin, xmax, ymax) 1-based)


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [-1, 1] of shape (h, w): random grid values upsampled bilinearly."""
    gh, gw = max(2, cells * h // max(h, w)), max(2, cells * w // max(h, w))
    grid = rng.uniform(-1, 1, size=(gh, gw)).astype(np.float32)
    return np.asarray(Image.fromarray(grid, mode="F").resize((w, h), Image.BILINEAR))


def _shape_mask(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, cx: float, cy: float,
                a: float, b: float) -> np.ndarray:
    """A rotated ellipse or rounded rectangle with semi-axes a, b centred at (cx, cy)."""
    t = rng.uniform(0, np.pi)
    u = ((xx - cx) * np.cos(t) + (yy - cy) * np.sin(t)) / a
    v = (-(xx - cx) * np.sin(t) + (yy - cy) * np.cos(t)) / b
    if rng.random() < 0.5:
        return u * u + v * v <= 1.0
    return np.abs(u) ** 4 + np.abs(v) ** 4 <= 1.0  # a squircle: rectangle with rounded corners


def make_scene(seed: int, index: int, size: int = 128, classes: tuple[int, ...] = DEFAULT_CLASSES,
               max_objects: int = 3) -> Scene:
    """One deterministic scene for (seed, index): long side `size`, 1..max_objects objects."""
    rng = np.random.default_rng([seed, index])
    short = int(round(size * rng.uniform(0.6, 1.0)))
    h, w = (short, size) if rng.random() < 0.7 else (size, short)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)

    # textured background: a muted colour, low-frequency blotches, a faint random grating, pixel noise
    base = rng.uniform(70, 180, size=3).astype(np.float32)
    base = 0.5 * base + 0.5 * base.mean()
    blotch = _smooth_noise(rng, h, w, 6)[..., None] * rng.uniform(20, 45, size=3).astype(np.float32)
    f, th = rng.uniform(0.08, 0.3), rng.uniform(0, np.pi)
    grating = 10.0 * np.sin(f * (xx * np.cos(th) + yy * np.sin(th)))[..., None]
    img = base + blotch + grating + rng.normal(0, 6, size=(h, w, 3)).astype(np.float32)

    inst = np.zeros((h, w), np.int32)          # 0 = background, j = object j (1-based), later on top
    obj_cls: list[int] = []
    n_obj = int(rng.integers(1, max_objects + 1))
    for _ in range(n_obj):
        for _try in range(10):
            c = int(classes[rng.integers(len(classes))])
            a = rng.uniform(0.16, 0.32) * w
            b = rng.uniform(0.16, 0.32) * h
            cx, cy = rng.uniform(0.15, 0.85) * w, rng.uniform(0.15, 0.85) * h
            body = _shape_mask(rng, yy, xx, cx, cy, a, b)
            if body.sum() < 0.02 * h * w:
                continue
            # keep every earlier object at least 40% visible, so occlusion never hides a labelled one
            trial = np.where(body, len(obj_cls) + 1, inst)
            ok = all((trial == j + 1).sum() >= 0.4 * (inst == j + 1).sum() for j in range(len(obj_cls))
                     if (inst == j + 1).any())
            if ok:
                break
        else:
            continue
        obj_cls.append(c)
        inst = trial
        # shared body appearance: light grey, fine diagonal stripes
        shade = rng.uniform(0.9, 1.1)
        stripes = (((xx + yy) // 3) % 2)[..., None] * 25.0
        body_rgb = np.array([150, 150, 160], np.float32) * shade + stripes
        img = np.where(body[..., None], body_rgb, img)
        # class patch: a disc of about a third of the smaller semi-axis... to half, inside the body
        r = rng.uniform(0.35, 0.5) * min(a, b)
        px = cx + rng.uniform(-0.4, 0.4) * a
        py = cy + rng.uniform(-0.4, 0.4) * b
        patch = body & ((xx - px) ** 2 + (yy - py) ** 2 <= r * r)
        k = classes.index(c) if c in classes else c
        colour = _PATCH_COLOURS[k % len(_PATCH_COLOURS)]
        ang = np.pi * k / max(len(classes), 1)
        band = ((np.floor((xx * np.cos(ang) + yy * np.sin(ang)) / 3) % 2) == 0)[..., None]
        patch_rgb = np.where(band, colour, colour * 0.6)
        img = np.where(patch[..., None], patch_rgb, img)

    img = np.clip(img, 0, 255).astype(np.uint8)
    lut = np.array([0] + [c + 1 for c in obj_cls], np.uint8)
    mask_sbd = lut[inst]
    bw = max(1, int(round(size / 160)))
    edge = ndimage.maximum_filter(inst, size=2 * bw + 1) != ndimage.minimum_filter(inst, size=2 * bw + 1)
    mask = np.where(edge, IGNORE_INDEX, mask_sbd).astype(np.uint8)

    objects = []
    for j, c in enumerate(obj_cls):
        visible = (inst == j + 1) & (mask != IGNORE_INDEX)
        if not visible.any():
            continue
        ys, xs = np.nonzero(inst == j + 1)
        objects.append((c, (int(xs.min()) + 1, int(ys.min()) + 1, int(xs.max()) + 1, int(ys.max()) + 1)))
    return Scene(img, mask, mask_sbd, objects)


def annotation_xml(image_id: str, width: int, height: int, objects: list) -> str:
    """A VOC-style annotation file for one image."""
    parts = [f"<annotation><folder>VOC2012</folder><filename>{escape(image_id)}.jpg</filename>",
             f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size>",
             "<segmented>1</segmented>"]
    for c, (x0, y0, x1, y1) in objects:
        parts.append(f"<object><name>{CLASS_NAMES[c]}</name><pose>Unspecified</pose><truncated>0</truncated>"
                     f"<difficult>0</difficult><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin>"
                     f"<xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>")
    parts.append("</annotation>\n")
    return "".join(parts)


def _write(path: Path, data: bytes | str) -> None:
    atomic_write(path, data)


def _jpeg(img: np.ndarray) -> bytes:
    import io
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _sbd_mat(scene: Scene) -> bytes:
    """An SBD-style cls .mat (struct GTcls with Segmentation and CategoriesPresent), byte-deterministic."""
    import io
    import scipy.io
    buf = io.BytesIO()
    scipy.io.savemat(buf, {"GTcls": {
        "Segmentation": scene.mask_sbd,
        "CategoriesPresent": np.array(sorted({c + 1 for c, _ in scene.objects}), np.uint8)}})
    data = buf.getvalue()
    # the 116-byte text header carries a creation time; fix it so the same seed gives the same bytes
    header = b"MATLAB 5.0 MAT-file, written by vwe synth".ljust(116)
    return header + data[116:]


MIN_SIZE = 16  # long side in pixels; below it the objects shrink to a pixel or two


def _write_scene(item: tuple[int, str], seed: int, size: int, classes: tuple[int, ...], dirs: dict[str, Path],
                 sbd_dir: Path | None) -> None:
    """The files of image `idx` (JPEG, annotation, masks; SBD's .mat and JPEG with sbd_dir)."""
    idx, image_id = item
    scene = make_scene(seed, idx, size=size, classes=classes)
    jpg = _jpeg(scene.image)
    h, w = scene.mask.shape
    _write(dirs["JPEGImages"] / f"{image_id}.jpg", jpg)
    _write(dirs["Annotations"] / f"{image_id}.xml", annotation_xml(image_id, w, h, scene.objects))
    in_voc_seg = not image_id.startswith("synth_sbd_")
    if in_voc_seg:
        _write(dirs["SegmentationClass"] / f"{image_id}.png", encode_mask(scene.mask))
    _write(dirs["SegmentationClassAug"] / f"{image_id}.png", encode_mask(scene.mask if in_voc_seg else scene.mask_sbd))
    if sbd_dir is not None:
        _write(sbd_dir / "cls" / f"{image_id}.mat", _sbd_mat(scene))
        _write(sbd_dir / "img" / f"{image_id}.jpg", jpg)


def write_dataset(out: Path, n_train: int = 64, n_val: int = 16, seed: int = 0, size: int = 128,
                  sbd: bool = False, classes: tuple[int, ...] = DEFAULT_CLASSES, workers: int = 1) -> Path:
    """Write a synthetic data set under out/VOCdevkit/VOC2012 (and out/benchmark_RELEASE with sbd=True).

    Ids: synth_000000.. (VOC train, then val); with sbd, n_train more images synth_sbd_000000.. exist in
    JPEGImages, Annotations and SegmentationClassAug but not in the VOC segmentation lists, and the SBD
    lists hold them plus some VOC train and val ids (so train_aug = SBD train+val + VOC train - VOC val
    differs from every single list). `workers` processes make the images (0: one per core; at most one
    per 16 images; a pool leaves multiprocessing's resource tracker running in the calling process, so
    in-process callers keep the default 1). Returns the VOC2012 folder.
    """
    for name, value, least in (("--train", n_train, 1), ("--val", n_val, 1), ("--size", size, MIN_SIZE)):
        if not isinstance(value, int) or value < least:
            raise DataError(f"{name} {value}: must be an integer >= {least}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file; give a folder for the data set")
    voc = out / "VOCdevkit" / "VOC2012"
    dirs = {k: voc / k for k in ("JPEGImages", "Annotations", "SegmentationClass", "SegmentationClassAug")}
    for d in (*dirs.values(), voc / "ImageSets" / "Segmentation"):
        d.mkdir(parents=True, exist_ok=True)
    train_ids = [f"synth_{i:06d}" for i in range(n_train)]
    val_ids = [f"synth_{i:06d}" for i in range(n_train, n_train + n_val)]
    extra_ids = [f"synth_sbd_{i:06d}" for i in range(n_train)] if sbd else []
    if sbd:
        sbd_dir = out / "benchmark_RELEASE" / "dataset"
        (sbd_dir / "cls").mkdir(parents=True, exist_ok=True)
        (sbd_dir / "img").mkdir(parents=True, exist_ok=True)

    ids = train_ids + val_ids + extra_ids
    write = functools.partial(_write_scene, seed=seed, size=size, classes=classes, dirs=dirs,
                              sbd_dir=sbd_dir if sbd else None)
    workers = max(1, min(workers or usable_cores(), len(ids) // 16))  # a pool pays off from a few dozen images
    if workers == 1:
        for item in enumerate(ids):
            write(item)
    else:  # each image depends on (seed, index) alone: the files are the same for any number of workers
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            list(pool.map(write, enumerate(ids), chunksize=8))

    lists = voc / "ImageSets" / "Segmentation"
    _write(lists / "train.txt", "".join(f"{i}\n" for i in train_ids))
    _write(lists / "val.txt", "".join(f"{i}\n" for i in val_ids))
    _write(lists / "trainval.txt", "".join(f"{i}\n" for i in train_ids + val_ids))
    if sbd:
        cut = (3 * len(extra_ids)) // 4
        sbd_train = extra_ids[:cut] + train_ids[: len(train_ids) // 2]
        sbd_val = extra_ids[cut:] + val_ids[: (len(val_ids) + 1) // 2]
        _write(sbd_dir / "train.txt", "".join(f"{i}\n" for i in sbd_train))
        _write(sbd_dir / "val.txt", "".join(f"{i}\n" for i in sbd_val))
    print(f"synth: wrote {len(train_ids)} train, {len(val_ids)} val"
          + (f", {len(extra_ids)} SBD-only" if sbd else "") + f" images of long side {size} under {voc}")
    return voc
