"""Decoding and augmentation on uint8 images; normalisation where the batch lands (on the device).

Batches stay uint8 from the shard to the device (4x less to copy than float32). Where a crop is larger
than the resized image, the padding is the ImageNet mean colour, which `normalize` maps to about 0: the
uint8 equivalent of docs/method.md's zero padding after normalisation.
"""
from __future__ import annotations

import hashlib
import io

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from vwe.runtime.errors import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MEAN_UINT8 = tuple(int(round(255 * m)) for m in IMAGENET_MEAN)   # (124, 116, 104): the padding colour


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B,3,H,W) or (3,H,W) on any device -> float32 normalised with the ImageNet mean/std."""
    shape = (1, 3, 1, 1) if images.dim() == 4 else (3, 1, 1)
    mean = torch.tensor(IMAGENET_MEAN, device=images.device, dtype=torch.float32).view(shape) * 255.0
    std = torch.tensor(IMAGENET_STD, device=images.device, dtype=torch.float32).view(shape) * 255.0
    return (images.to(torch.float32) - mean) / std


def sample_rng(seed: int, epoch: int, key: str) -> np.random.Generator:
    """The random state of one sample's augmentation: a function of (seed, epoch, key) only."""
    h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
    return np.random.default_rng([seed, epoch, h])


def open_jpeg(data: bytes, where: str) -> Image.Image:
    """Open (lazily) a JPEG from bytes; a file that is not an image raises DataError naming `where`."""
    try:
        return Image.open(io.BytesIO(data))
    except Exception as e:
        raise DataError(f"{where}: cannot decode JPEG: {e}") from None


def load_rgb(im: Image.Image, where: str) -> Image.Image:
    """Decode fully into RGB; corrupt or truncated data raises DataError naming `where`."""
    try:
        im.load()
        return im if im.mode == "RGB" else im.convert("RGB")
    except Exception as e:
        raise DataError(f"{where}: cannot decode JPEG: {e}") from None


def png_size(data: bytes, where: str) -> tuple[int, int]:
    """(width, height) from a PNG header (no pixel decoding)."""
    try:
        im = Image.open(io.BytesIO(data))
    except Exception as e:
        raise DataError(f"{where}: cannot decode mask PNG: {e}") from None
    if im.format != "PNG":
        raise DataError(f"{where}: mask is not a PNG (format {im.format})")
    return im.size


RESIZE_MODES = ("bicubic", "bilinear")


def resize_uint8(x: torch.Tensor, size: tuple[int, int], mode: str = "bicubic") -> torch.Tensor:
    """Antialiased resize of a uint8 (1,3,H,W) tensor to size (h, w), staying uint8: the one resize of
    images in vwe (training's random resize and every inference scale).

    "bicubic" reproduces PIL's BICUBIC (what the published code used): on VOC-sized photos it differs
    from PIL by 0.006 grey levels on average (at most 2), and runs 3-5x faster than PIL's resize;
    "bilinear" is the earlier vwe default (about 1 grey level from PIL bicubic). Given a channels-last
    view (as made by `to_tensor`), torch takes its vectorised uint8 path.
    """
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got {mode!r}")
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode=mode, antialias=True, align_corners=False)


def scaled_size(w: int, h: int, scale: float) -> tuple[int, int]:
    """(h, w) of an image of size (w, h) resized by `scale`: each side rounded (half to even, as NumPy's
    round in the published code), at least 1."""
    return max(1, round(h * scale)), max(1, round(w * scale))


def to_tensor(im: Image.Image) -> torch.Tensor:
    """An RGB PIL image as a uint8 (1,3,H,W) tensor with channels-last memory (no transpose copy)."""
    return torch.from_numpy(np.array(im)).permute(2, 0, 1).unsqueeze(0)


def train_augment(jpg: bytes, rng: np.random.Generator, long_side: tuple[int, int], crop: int, flip: bool,
                  out: torch.Tensor, where: str, mask_png: bytes | None = None, resize: str = "bicubic") -> None:
    """Decode, resize (long side uniform in [lo, hi]; `resize` mode), flip, random crop/pad into `out`
    (3, crop, crop) uint8.

    Draws, in order: long side, flip, crop x, crop y; always all four, so the stream of draws does not
    depend on the image. JPEG draft mode lets libjpeg decode straight at 1/2, 1/4 or 1/8 scale when the
    target is that much smaller; the resize then works on far fewer pixels.
    """
    target = int(rng.integers(long_side[0], long_side[1] + 1))
    do_flip = bool(rng.random() < 0.5) and flip
    ux, uy = rng.random(2)
    im = open_jpeg(jpg, where)
    w0, h0 = im.size
    if mask_png is not None and png_size(mask_png, where) != (w0, h0):
        mw, mh = png_size(mask_png, where)
        raise DataError(f"{where}: mask is {mw}x{mh} but the image is {w0}x{h0}")
    scale = target / max(w0, h0)
    th, tw = scaled_size(w0, h0, scale)
    if scale <= 0.5:
        # libjpeg's DCT scaling by 1/2..1/8 (never below the target size); a VOC image (long side
        # 500) resized to [320, 640] never gets here, so the paper recipe is plain bicubic
        im.draft("RGB", (tw, th))
    x = resize_uint8(to_tensor(load_rgb(im, where)), (th, tw), resize)[0]
    # a crop window inside the image when it is larger, else the image placed at random in the crop
    cw, ch = min(crop, tw), min(crop, th)
    x0 = int(ux * (tw - cw + 1)) if tw > crop else 0
    y0 = int(uy * (th - ch + 1)) if th > crop else 0
    dx = int(ux * (crop - tw + 1)) if tw < crop else 0
    dy = int(uy * (crop - th + 1)) if th < crop else 0
    x = x[:, y0:y0 + ch, x0:x0 + cw]
    if do_flip:
        x = x.flip(-1)
    if (cw, ch) != (crop, crop):
        out.copy_(torch.tensor(MEAN_UINT8, dtype=torch.uint8).view(3, 1, 1).expand_as(out))
    out[:, dy:dy + ch, dx:dx + cw].copy_(x)


def resize_pair(im: Image.Image, scale: float, flip: bool, resize: str = "bicubic") -> torch.Tensor:
    """The image resized by `scale` (`resize` mode, size rounded from scale x side) and, with flip, its
    mirror: uint8 (1 or 2, 3, h, w)."""
    w, h = im.size
    a = resize_uint8(to_tensor(im), scaled_size(w, h, scale), resize)[0].contiguous()
    if not flip:
        return a.unsqueeze(0)
    return torch.stack([a, a.flip(-1)])


def seg_augment(jpg: bytes, target_png: bytes, rng: np.random.Generator, scales: tuple[float, ...], crop: int,
                flip: bool, image_out: torch.Tensor, target_out: torch.Tensor, where: str,
                ignore_index: int = 255) -> None:
    """deeplab-pytorch's training augmentation (docs/segmentation.md) into `image_out` (3, crop, crop) uint8
    and `target_out` (crop, crop) uint8: a scale drawn from `scales` (sides truncated as int(side x s)),
    the image resized bilinearly (no antialiasing, as cv2.INTER_LINEAR) and the target by PIL's nearest,
    padded at the bottom and right (image with the mean colour, target with `ignore_index`), a random
    crop, a random horizontal flip.

    Draws, in order: scale, crop y, crop x, flip; always all four, so the stream of draws does not depend
    on the image.
    """
    scale = float(scales[int(rng.integers(len(scales)))])
    uy, ux = rng.random(2)
    do_flip = bool(rng.random() < 0.5) and flip
    im = load_rgb(open_jpeg(jpg, where), where)
    w0, h0 = im.size
    try:
        label = Image.open(io.BytesIO(target_png))
        label.load()
    except Exception as e:
        raise DataError(f"{where}: cannot decode the target PNG: {e}") from None
    if label.size != (w0, h0):
        raise DataError(f"{where}: target is {label.size[0]}x{label.size[1]} but the image is {w0}x{h0}")
    if label.mode not in ("L", "P"):
        raise DataError(f"{where}: target must be an index PNG (mode P or L), got mode {label.mode}")
    h, w = max(1, int(h0 * scale)), max(1, int(w0 * scale))
    x = F.interpolate(to_tensor(im).float(), size=(h, w), mode="bilinear", align_corners=False)
    x = x.round().clamp(0, 255).to(torch.uint8)[0]
    y = torch.from_numpy(np.asarray(label.resize((w, h), Image.NEAREST), dtype=np.uint8).copy())
    ph, pw = max(h, crop), max(w, crop)
    y0, x0 = int(uy * (ph - crop + 1)), int(ux * (pw - crop + 1))
    image_out.copy_(torch.tensor(MEAN_UINT8, dtype=torch.uint8).view(3, 1, 1).expand_as(image_out))
    target_out.fill_(ignore_index)
    # the crop window of the padded image, intersected with the image itself
    ch, cw = max(0, min(h - y0, crop)), max(0, min(w - x0, crop))
    image_out[:, :ch, :cw].copy_(x[:, y0:y0 + ch, x0:x0 + cw])
    target_out[:ch, :cw].copy_(y[y0:y0 + ch, x0:x0 + cw])
    if do_flip:
        image_out.copy_(image_out.flip(-1))
        target_out.copy_(target_out.flip(-1))


def irn_augment(jpg: bytes, target_png: bytes, rng: np.random.Generator, scale_range: tuple[float, float], crop: int,
                flip: bool, image_out: torch.Tensor, target_out: torch.Tensor, where: str, ignore_index: int = 255,
                label_stride: int = 4) -> None:
    """IRNet's VOC12AffinityDataset augmentation (docs/irnet.md) into `image_out` (3, crop, crop) uint8 and
    `target_out` (round(crop / stride), same) uint8: a scale uniform in `scale_range` (sides rounded), the
    image resized bicubic (`resize_uint8`: torch's antialiased bicubic, which reproduces PIL's, docs/data.md)
    and the relation labels nearest, a random horizontal flip, a random crop (IRNet's `get_random_crop_box`:
    a side larger than the crop is cut at a random offset, a smaller one placed at a random offset in the
    crop; padding: the mean colour, i.e. 0 after normalisation as in IRNet, and `ignore_index`), then the
    labels reduced x1/stride with PIL nearest.

    Draws, in order: scale, flip, crop x, crop y; always all four, so the stream of draws does not depend
    on the image.
    """
    from vwe.nets.irn import downscale_label
    lo, hi = scale_range
    scale = lo + float(rng.random()) * (hi - lo)
    do_flip = bool(rng.random() < 0.5) and flip
    ux, uy = rng.random(2)
    im = load_rgb(open_jpeg(jpg, where), where)
    w0, h0 = im.size
    label = _index_png(target_png, (w0, h0), where)
    h, w = scaled_size(w0, h0, scale)
    x = resize_uint8(to_tensor(im), (h, w), "bicubic")[0]
    y = torch.from_numpy(np.asarray(label.resize((w, h), Image.NEAREST), dtype=np.uint8).copy())
    if do_flip:
        x, y = x.flip(-1), y.flip(-1)
    # IRNet's crop box: (image offset, crop offset) per side from one uniform draw
    iy, cy = (int(uy * (h - crop + 1)), 0) if h > crop else (0, int(uy * (crop - h + 1)))
    ix, cx = (int(ux * (w - crop + 1)), 0) if w > crop else (0, int(ux * (crop - w + 1)))
    ch, cw = min(crop, h), min(crop, w)
    image = torch.tensor(MEAN_UINT8, dtype=torch.uint8).view(3, 1, 1).repeat(1, crop, crop)
    full = torch.full((crop, crop), ignore_index, dtype=torch.uint8)
    image[:, cy:cy + ch, cx:cx + cw] = x[:, iy:iy + ch, ix:ix + cw]
    full[cy:cy + ch, cx:cx + cw] = y[iy:iy + ch, ix:ix + cw]
    image_out.copy_(image)
    target_out.copy_(torch.from_numpy(downscale_label(full.numpy(), 1 / label_stride).copy()))


def _index_png(data: bytes, size: tuple[int, int], where: str) -> Image.Image:
    """A target PNG decoded and checked against the image's (width, height) and mode."""
    try:
        label = Image.open(io.BytesIO(data))
        label.load()
    except Exception as e:
        raise DataError(f"{where}: cannot decode the target PNG: {e}") from None
    if label.size != size:
        raise DataError(f"{where}: target is {label.size[0]}x{label.size[1]} but the image is {size[0]}x{size[1]}")
    if label.mode not in ("L", "P"):
        raise DataError(f"{where}: target must be an index PNG (mode P or L), got mode {label.mode}")
    return label
