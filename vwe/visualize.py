"""Picture grids: the image, its ground truth, a CAM heat map per positive class, the prediction, a legend."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from vwe.cam_io import cam_dir_for, read_cam
from vwe.config import Config
from vwe.data.loader import infer_samples
from vwe.data.shards import load_index
from vwe.data.voc import CLASS_NAMES, voc_palette
from vwe.errors import DataError
from vwe.io import atomic_write
from vwe.metrics import cam_to_label, mask_value_problem

TILE = 160
LABEL_H = 14


def heat_colours(x: np.ndarray) -> np.ndarray:
    """Map [0, 1] to a blue-cyan-yellow-red ramp, uint8 RGB."""
    x = np.clip(x, 0.0, 1.0)
    r = np.clip(1.5 - np.abs(4 * x - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * x - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * x - 1), 0, 1)
    return (np.stack([r, g, b], -1) * 255).astype(np.uint8)


def colour_mask(label: np.ndarray) -> np.ndarray:
    pal = np.asarray(voc_palette(), dtype=np.uint8).reshape(-1, 3)
    return pal[label.astype(np.int64) % len(pal)]


def _tile(rgb: np.ndarray, title: str) -> Image.Image:
    img = Image.fromarray(rgb).convert("RGB")
    scale = TILE / max(img.size)
    img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.NEAREST)
    tile = Image.new("RGB", (TILE, TILE + LABEL_H), "white")
    tile.paste(img, ((TILE - img.width) // 2, LABEL_H))
    ImageDraw.Draw(tile).text((2, 1), title[:26], fill="black")
    return tile


def picture_row(image: np.ndarray, mask: np.ndarray | None, keys: np.ndarray, high_res: np.ndarray,
                bkg: float, key: str) -> Image.Image:
    """One image's row: image, ground truth, one heat map per kept class, prediction, legend."""
    tiles = [_tile(image, key)]
    if mask is not None:
        tiles.append(_tile(colour_mask(mask), "ground truth"))
    for k, cam in zip(keys, high_res.astype(np.float32)):
        blend = (0.5 * image + 0.5 * heat_colours(cam)).astype(np.uint8)
        tiles.append(_tile(blend, f"CAM {CLASS_NAMES[k]}"))
    pred = cam_to_label(high_res, keys, bkg)
    tiles.append(_tile(colour_mask(pred), f"prediction bkg={bkg:g}"))
    present = sorted(set(np.unique(pred).tolist()) | (set(np.unique(mask).tolist()) if mask is not None else set()))
    present = [c for c in present if c != 255]
    legend = Image.new("RGB", (TILE, TILE + LABEL_H), "white")
    draw = ImageDraw.Draw(legend)
    pal = colour_mask(np.array(present))
    for i, (c, rgb) in enumerate(zip(present, pal)):
        y = 4 + 14 * i
        draw.rectangle([4, y, 14, y + 10], fill=tuple(int(v) for v in rgb), outline="black")
        draw.text((20, y), "background" if c == 0 else CLASS_NAMES[c - 1], fill="black")
    tiles.append(legend)
    row = Image.new("RGB", (TILE * len(tiles), TILE + LABEL_H), "white")
    for i, t in enumerate(tiles):
        row.paste(t, (i * TILE, 0))
    return row


def visualize(cfg: Config, ids: list[str], out: Path) -> Path:
    """Write one PNG with a row per id (image, ground truth, CAMs, prediction, legend). The CAMs are read
    from eval.cams, or the run's CAM folder; a bad CAM or mask is a DataError naming the file or sample."""
    wanted = set(ids)
    cam_dir = Path(cfg.eval.cams) if cfg.eval.cams else cam_dir_for(cfg)
    idx = load_index(cfg.data.root, cfg.data.infer_split)
    shard_of = {k: s.name for s in idx.shards for k in s.keys}
    rows: dict[str, Image.Image] = {}
    for sample in infer_samples(cfg, 0, 1, with_scales=False):
        key = sample["key"]
        if key not in wanted:
            continue
        path = cam_dir / f"{key}.npz"
        rec = read_cam(path, num_classes=len(CLASS_NAMES))
        image = sample["image"].permute(1, 2, 0).numpy()
        mask = sample["mask"].numpy() if sample["mask"] is not None else None
        if mask is not None:
            problem = mask_value_problem(mask, len(CLASS_NAMES) + 1)
            if problem:
                raise DataError(f"shard {shard_of.get(key, '?')}, sample {key!r}: mask {problem}")
        if rec.high_res.shape[1:] != image.shape[:2]:
            raise DataError(f"CAM file {path}: size {rec.high_res.shape[1:]} differs from its image "
                            f"{image.shape[:2]}")
        rows[key] = picture_row(image, mask, rec.keys, rec.high_res, cfg.eval.bkg, key)
        if len(rows) == len(wanted):
            break
    missing = [i for i in ids if i not in rows]
    if missing:
        raise DataError(f"visualize: id(s) not in split '{cfg.data.infer_split}': {', '.join(missing)}")
    width = max(r.width for r in rows.values())
    sheet = Image.new("RGB", (width, sum(r.height for r in rows.values())), "white")
    y = 0
    for i in ids:
        sheet.paste(rows[i], (0, y))
        y += rows[i].height
    atomic_write(out, lambda f: sheet.save(f, format="PNG"), "picture")
    print(f"wrote {out}")
    return out
