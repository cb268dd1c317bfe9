"""Picture grids that read like a paper figure: per image its photo, ground truth, prediction, a CAM heat
map per positive class and a legend, in aligned columns, with one colour bar for the heat maps."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from vwe.formats.cams import cam_dir_for, read_cam
from vwe.formats.config import Config
from vwe.data.loader import infer_samples
from vwe.data.index import load_index
from vwe.data.voc import CLASS_NAMES
from vwe.formats.labels import voc_palette
from vwe.runtime.errors import DataError
from vwe.runtime.files import atomic_write
from vwe.report.miou import cam_to_label, mask_value_problem

TILE = 160
LABEL_H = 14
BAR_H = 30   # the colour bar under a grid
BAR_PAD = 8


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


def _tile(rgb: np.ndarray, title: str, photo: bool = True) -> Image.Image:
    """A TILE-wide thumbnail with its title: antialiased (Lanczos) for photos and heat maps, nearest
    neighbour for label maps, whose colours are class ids."""
    img = Image.fromarray(rgb).convert("RGB")
    scale = TILE / max(img.size)
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    img = img.resize(size, Image.LANCZOS if photo else Image.NEAREST)
    tile = _blank(title[:26])
    tile.paste(img, ((TILE - img.width) // 2, LABEL_H))
    return tile


def picture_tiles(image: np.ndarray, mask: np.ndarray | None, keys: np.ndarray, high_res: np.ndarray,
                  bkg: float, key: str) -> tuple[list[Image.Image], list[Image.Image], Image.Image]:
    """One image's tiles: (image, ground truth, prediction), one heat map per kept class, a legend."""
    pred = cam_to_label(high_res, keys, bkg)
    fixed = [_tile(image, key),
             _tile(colour_mask(mask), "ground truth", photo=False) if mask is not None else _blank("no mask"),
             _tile(colour_mask(pred), f"prediction bkg={bkg:g}", photo=False)]
    cams = [_tile((0.5 * image + 0.5 * heat_colours(cam)).astype(np.uint8), f"CAM {CLASS_NAMES[k]}")
            for k, cam in zip(keys, high_res.astype(np.float32))]
    present = sorted(set(np.unique(pred).tolist()) | (set(np.unique(mask).tolist()) if mask is not None else set()))
    present = [c for c in present if c != 255 and c <= len(CLASS_NAMES)]
    legend = _blank("classes")
    draw = ImageDraw.Draw(legend)
    for i, (c, rgb) in enumerate(zip(present, colour_mask(np.array(present, dtype=np.int64)))):
        y = LABEL_H + 4 + 14 * i
        draw.rectangle([4, y, 14, y + 10], fill=tuple(int(v) for v in rgb), outline="black")
        draw.text((20, y), "background" if c == 0 else CLASS_NAMES[c - 1], fill="black")
    return fixed, cams, legend


def _blank(title: str) -> Image.Image:
    """An empty white tile with its title."""
    tile = Image.new("RGB", (TILE, TILE + LABEL_H), "white")
    ImageDraw.Draw(tile).text((2, 1), title, fill="black")
    return tile


def colour_bar(width: int) -> Image.Image:
    """The heat maps' scale: a horizontal ramp from 0 to 1 (each CAM is divided by its maximum)."""
    bar = Image.new("RGB", (width, BAR_H), "white")
    ramp = heat_colours(np.linspace(0.0, 1.0, width - 2 * BAR_PAD))
    bar.paste(Image.fromarray(np.repeat(ramp[None], 10, axis=0)), (BAR_PAD, 4))
    draw = ImageDraw.Draw(bar)
    for x, text in ((BAR_PAD, "0"), (width // 2, "0.5"), (width - BAR_PAD - 6, "1")):
        draw.text((x, 16), text, fill="black")
    draw.text((BAR_PAD + 30, 16), "CAM score (each map divided by its maximum)", fill="black")
    return bar


def picture_grid(rows: list[tuple[list[Image.Image], list[Image.Image], Image.Image]]) -> Image.Image:
    """Rows of tiles in aligned columns (image | ground truth | prediction | CAMs ... | legend; rows with
    fewer CAMs keep the columns blank), one colour bar under the grid."""
    slots = max((len(cams) for _, cams, _ in rows), default=0)
    columns = 3 + slots + 1
    width, height = TILE * columns, (TILE + LABEL_H) * len(rows)
    sheet = Image.new("RGB", (width, height + BAR_H), "white")
    for r, (fixed, cams, legend) in enumerate(rows):
        y = r * (TILE + LABEL_H)
        for c, tile in enumerate([*fixed, *cams]):
            sheet.paste(tile, (c * TILE, y))
        sheet.paste(legend, ((columns - 1) * TILE, y))
    sheet.paste(colour_bar(width), (0, height))
    return sheet


def picture_row(image: np.ndarray, mask: np.ndarray | None, keys: np.ndarray, high_res: np.ndarray,
                bkg: float, key: str) -> Image.Image:
    """One image's row (a one-row grid with its colour bar)."""
    return picture_grid([picture_tiles(image, mask, keys, high_res, bkg, key)])


PICTURE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


def picture_format(out: Path) -> str:
    """PIL's format for a picture file, from its suffix; DataError for a suffix it is not written as."""
    fmt = PICTURE_FORMATS.get(Path(out).suffix.lower())
    if fmt is None:
        raise DataError(f"--out {out}: name the picture .png, .jpg or .webp (the file name sets its format)")
    return fmt


def visualize(cfg: Config, ids: list[str], out: Path) -> Path:
    """Write one picture (PNG, JPEG or WebP by the name of `out`) with a row per id (image, ground truth, CAMs, prediction, legend). The CAMs are read
    from eval.cams, or the run's CAM folder; a bad CAM or mask is a DataError naming the file or sample."""
    fmt = picture_format(out)
    wanted = set(ids)
    cam_dir = Path(cfg.eval.cams) if cfg.eval.cams else cam_dir_for(cfg)
    idx = load_index(cfg.data.root, cfg.data.infer_split)
    shard_of = {k: s.name for s in idx.shards for k in s.keys}
    rows: dict[str, tuple] = {}
    for sample in infer_samples(cfg.data, cfg.infer, 0, 1, with_scales=False):
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
        rows[key] = picture_tiles(image, mask, rec.keys, rec.high_res, cfg.eval.bkg, key)
        if len(rows) == len(wanted):
            break
    missing = [i for i in ids if i not in rows]
    if missing:
        raise DataError(f"visualize: id(s) not in split '{cfg.data.infer_split}': {', '.join(missing)}")
    sheet = picture_grid([rows[i] for i in ids])
    atomic_write(out, lambda f: sheet.convert("RGB").save(f, format=fmt), "picture")
    print(f"wrote {out}")
    return out
