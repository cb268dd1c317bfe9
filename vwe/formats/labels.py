"""Label PNGs as vwe writes them (pseudo labels, predictions): an index PNG (values 0..20, 255 ignore), grey
(mode L) or with the VOC palette (mode P, the PASCAL layout), carrying in a text chunk the source it was
made from (the hash of its input and the settings), so a rerun can tell an up-to-date file from a stale one.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin

SOURCE_KEY = "vwe_source"  # PNG text chunk: what the labels were made from, and how


def voc_palette() -> list[int]:
    """The 256-entry VOC colour map as a flat [r, g, b, ...] list (index 255 is (224, 224, 192))."""
    pal = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    return pal


def encode_label_png(label: np.ndarray, source: str, palette: bool) -> bytes:
    """An index PNG (mode L), or with `palette` a VOC-colour PNG (mode P, same index values)."""
    im = Image.fromarray(label.astype(np.uint8), mode="P" if palette else "L")
    if palette:
        im.putpalette(voc_palette())
    info = PngImagePlugin.PngInfo()
    info.add_text(SOURCE_KEY, source)
    buf = io.BytesIO()
    im.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def read_label_png(path: Path) -> tuple[np.ndarray, str] | None:
    """(label map, its source text), or None when the file is absent or unreadable (then it is redone)."""
    try:
        with Image.open(path) as im:
            im.load()
            return np.asarray(im, dtype=np.uint8), im.text.get(SOURCE_KEY, "")
    except (OSError, ValueError, SyntaxError):
        return None
