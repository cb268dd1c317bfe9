"""The picture grid's layout: aligned columns whatever the number of CAMs per row, antialiased photo
thumbnails, nearest-neighbour label maps, one colour bar for the heat maps."""
from __future__ import annotations

import numpy as np
import pytest

from vwe.report.visualize import BAR_H, BAR_PAD, LABEL_H, TILE, heat_colours, picture_grid, picture_tiles


def _row(keys: list[int], size=(320, 320)):
    h, w = size
    image = ((np.indices((h, w)).sum(0) % 2) * 255).astype(np.uint8)[..., None].repeat(3, -1)  # 1-px checkerboard
    mask = np.zeros((h, w), np.uint8)
    mask[h // 4:h // 2, w // 4:w // 2] = keys[0] + 1
    cams = np.random.default_rng(0).random((len(keys), h, w)).astype(np.float32)
    return picture_tiles(image, mask, np.array(keys), cams, 0.3, f"img{len(keys)}")


def test_columns_align_and_one_colour_bar():
    grid = np.asarray(picture_grid([_row([0]), _row([1, 5, 7])]))
    columns = 3 + 3 + 1
    row_h = TILE + LABEL_H
    assert grid.shape == (2 * row_h + BAR_H, TILE * columns, 3)
    legend_x = (columns - 1) * TILE + 9
    for r in range(2):  # the legend's first swatch (background, black) sits in the last column of every row
        assert tuple(grid[r * row_h + LABEL_H + 9, legend_x]) == (0, 0, 0)
    # row 0 has one CAM: its two unused CAM columns are blank
    assert (grid[LABEL_H:row_h, 4 * TILE:6 * TILE] == 255).all()
    assert not (grid[row_h + LABEL_H:2 * row_h, 4 * TILE:6 * TILE] == 255).all()
    bar_y = 2 * row_h + 8
    np.testing.assert_allclose(grid[bar_y, BAR_PAD + 1], heat_colours(np.array(0.0)), atol=12)
    np.testing.assert_allclose(grid[bar_y, TILE * columns - BAR_PAD - 2], heat_colours(np.array(1.0)), atol=12)


def test_photos_are_antialiased_and_label_maps_are_not():
    fixed, _, _ = _row([2])
    photo = np.asarray(fixed[0])[LABEL_H + 20:LABEL_H + TILE - 20, 20:TILE - 20].astype(float)
    assert abs(photo.mean() - 127.5) < 20 and photo.std() < 30  # a 1-px checkerboard averages to grey
    labels = np.asarray(fixed[1])[LABEL_H:, :]
    colours = {tuple(c) for c in labels.reshape(-1, 3)}
    assert len(colours) <= 3  # background, the class colour, the white margin: no blended colours


def test_the_picture_format_follows_the_file_name(tmp_path):
    import io as _io

    from PIL import Image

    from vwe.report.visualize import picture_format
    from vwe.runtime.errors import DataError
    assert [picture_format(tmp_path / n) for n in ("a.png", "a.JPG", "a.jpeg", "a.webp")] == \
        ["PNG", "JPEG", "JPEG", "WEBP"]
    for name in ("a.gif", "a"):
        with pytest.raises(DataError, match=r"name the picture \.png, \.jpg or \.webp"):
            picture_format(tmp_path / name)
    buf = _io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format=picture_format(tmp_path / "x.jpg"))
    assert buf.getvalue()[:3] == b"\xff\xd8\xff"  # JPEG bytes, not PNG
