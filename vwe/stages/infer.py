"""Multi-scale + flip CAM inference (docs/method.md), each rank on a disjoint part of the split.

Only the CAM path runs (backbone + classifier). Images of equal size are batched with their flips; at
most infer.group_window (default infer.batch_size) images wait in memory, however many distinct sizes
the split has. The scales are made by the loader, or (infer.resize_on) on the device from the decoded
image, with the same pixels. The per-image pass (vwe/stages/perimage.py) writes one `<id>.npz` per
image, skips images already done with the same weights and keeps the manifests.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vwe.data.loader import infer_samples
from vwe.data.resample import resize_exact
from vwe.data.transforms import normalize, scaled_size
from vwe.formats.cams import CamRecord, cam_dir_for, cam_writer, export_legacy, read_cam
from vwe.formats.checkpoint import FINAL_WEIGHTS_NAME, META, check_compatible, load_weights, read_meta
from vwe.formats.config import Config, ModelConfig, config_from_dict
from vwe.nets.backbone import FROZEN_NORMS, fold_frozen_bn
from vwe.nets.cam import build_model
from vwe.runtime.device import autocast as device_autocast, precision_note, resolve_precision
from vwe.runtime.dist import distributed_state
from vwe.runtime.errors import CheckpointError
from vwe.runtime.files import file_sha256
from vwe.runtime.skips import SkipPolicy
from vwe.stages.perimage import ImageWork, Output, run_per_image


WEIGHTS_FILE = "model.safetensors"  # in <run_dir>/final/ and in each training checkpoint folder


def weights_path(cfg: Config) -> Path:
    """The weights file `vwe infer` uses now: `infer.weights` (a file, or a folder holding model.safetensors:
    a training checkpoint or <run_dir>/final), else the run's exported final weights. CheckpointError
    naming the path and the file expected when there is none."""
    if not cfg.infer.weights:
        path = Path(cfg.output.run_dir) / FINAL_WEIGHTS_NAME
        if not path.is_file():
            raise CheckpointError(f"weights file {path} not found: train first (`vwe train`), or set infer.weights "
                                  f"to a weights file or a training checkpoint folder")
        return path
    given = Path(cfg.infer.weights)
    if given.is_dir():
        path = given / WEIGHTS_FILE
        if not path.is_file():
            raise CheckpointError(f"infer.weights: folder {given} has no {WEIGHTS_FILE}; expected a weights file "
                                  f"(<run_dir>/{FINAL_WEIGHTS_NAME}) or a training checkpoint folder "
                                  f"(<run_dir>/checkpoints/step-NNNNNN/{WEIGHTS_FILE})")
        return path
    if not given.is_file():
        raise CheckpointError(f"infer.weights: {given} not found (a weights file such as "
                              f"<run_dir>/{FINAL_WEIGHTS_NAME}, or a training checkpoint folder)")
    return given


def _saved_model_config(path: Path, saved: dict) -> dict:
    """The config stored with the weights: in the file (exported weights) or in the checkpoint folder's
    meta.json (a training checkpoint); {} when neither has one."""
    if saved:
        return saved
    if (path.parent / META).is_file():
        return read_meta(path.parent).get("config", {})
    return {}


def load_cam_model(cfg: Config, device: torch.device) -> tuple[torch.nn.Module, str, ModelConfig]:
    """The network built from the config stored with the weights, in eval mode, frozen BatchNorm folded
    into the convolutions; the weights' hash; the model config used."""
    path = weights_path(cfg)
    state_dict, saved = load_weights(path)
    saved = _saved_model_config(path, saved)
    if saved:
        check_compatible({"config": saved}, vars(cfg.model), path)
        # only the model section: configs stored by older versions may hold keys since renamed
        model_cfg = config_from_dict({"model": saved["model"]}, src=str(path)).model
    else:
        model_cfg = cfg.model
    bad = [k for k, t in state_dict.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise CheckpointError(f"weights file {path}: {len(bad)} tensor(s) hold NaN or Inf (e.g. {', '.join(bad[:3])}); "
                              f"the training that wrote them diverged")
    model_cfg = dataclasses.replace(model_cfg, pretrained="none")  # the weights come from the file
    model = build_model(model_cfg)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"weights file {path} does not fit the model: {e}") from None
    if model_cfg.norm in FROZEN_NORMS:
        fold_frozen_bn(model)  # an affine map after a convolution: one convolution at inference
    model.eval().to(device)
    return model, file_sha256(path), model_cfg


@torch.no_grad()
def multiscale_cams(model: torch.nn.Module, scales: list[torch.Tensor], size: tuple[int, int],
                    device: torch.device, channels_last: bool = True,
                    autocast=contextlib.nullcontext, flip: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum over scales of max(cam(image), unflip(cam(flip))), resized to `size` and to size/4 (ceil).

    `scales[i]` is uint8 (2N, 3, h, w): N images followed by their N horizontal flips ((N, 3, h, w) and
    no maximum with the flip when `flip` is false).
    Returns (high_res (N, C, H, W), strided (N, C, ceil(H/4), ceil(W/4))), float32, unnormalised.
    """
    strided_size = (-(-size[0] // 4), -(-size[1] // 4))
    high = strided = None
    for x in scales:
        x = normalize(x.to(device, non_blocking=True))
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast():
            cam = model.cam(x)
        cam = cam.float()
        if flip:
            n = cam.shape[0] // 2
            cam = torch.maximum(cam[:n], cam[n:].flip(-1))
        up = F.interpolate(cam, size, mode="bilinear", align_corners=False)
        down = F.interpolate(cam, strided_size, mode="bilinear", align_corners=False)
        high = up if high is None else high + up
        strided = down if strided is None else strided + down
    return high, strided


def device_scales(images: torch.Tensor, scales: list[float], flip: bool, mode: str) -> list[torch.Tensor]:
    """What the loader makes at each scale (`resize_pair`), made where `images` (uint8 (N, 3, H, W), one
    size) are: per scale, the N resized images, then (with flip) their N mirrors. The same pixels as the
    loader's, bit for bit (vwe/data/resample.py)."""
    h, w = images.shape[-2:]
    out = []
    for s in scales:
        x = resize_exact(images, scaled_size(w, h, s), mode)
        out.append(torch.cat([x, x.flip(-1)]) if flip else x)
    return out


def keep_positive(labels: torch.Tensor, *cams: torch.Tensor) -> tuple[np.ndarray, list[torch.Tensor]]:
    """The positive classes' indices, and each of `cams` (one image's maps at any sizes, on one device)
    reduced to those channels, each divided by its own maximum + 1e-5. `labels` on the host: the index
    goes to the device once, and nothing here waits for the device."""
    keys = torch.nonzero(labels > 0.5).flatten()
    index = keys
    if cams[0].is_cuda:  # a pageable copy would wait for every kernel queued before it
        index = keys.pin_memory().to(cams[0].device, non_blocking=True)
    kept = [cam.index_select(0, index) for cam in cams]
    kept = [k / (k.flatten(1).amax(dim=1).view(-1, 1, 1) + 1e-5) for k in kept]
    return keys.numpy().astype(np.int64), kept


class DeviceClock:
    """Seconds the write threads waited for the device (thread-safe)."""

    def __init__(self) -> None:
        self.seconds, self._lock = 0.0, threading.Lock()

    def add(self, seconds: float) -> None:
        with self._lock:
            self.seconds += seconds


class Fetch:
    """Device tensors on their way to the host, copied without waiting (pinned memory on a GPU): the
    device goes on with the next batch while they travel. `wait()` returns them once they have arrived
    and adds the seconds it blocked to `clock` (nothing to wait for on a CPU)."""

    def __init__(self, tensors: list[torch.Tensor], device: torch.device, clock: DeviceClock) -> None:
        self.host = [t.to("cpu", non_blocking=True) for t in tensors]
        self.event, self.clock = None, clock
        if device.type == "cuda":
            self.event = torch.cuda.Event()
            self.event.record()

    def wait(self) -> list[torch.Tensor]:
        if self.event is not None:
            t0 = time.perf_counter()
            self.event.synchronize()
            self.clock.add(time.perf_counter() - t0)
        return self.host


class CamWork(ImageWork):
    """Multi-scale + flip CAMs of one group of equal-size images (the per-image part of `vwe infer`)."""
    name, what, suffix = "infer", "CAM", ".npz"

    def __init__(self, cfg: Config, model: torch.nn.Module, weights_sha256: str, model_cfg: ModelConfig,
                 precision: str, device: torch.device) -> None:
        self.cfg, self.model, self.weights_sha256, self.precision = cfg, model, weights_sha256, precision
        self.device, self.channels_last = device, model_cfg.channels_last
        self.out_dir, self.split, self.data_root = cam_dir_for(cfg), cfg.data.infer_split, cfg.data.root
        self.batch_size, self.window = cfg.infer.batch_size, cfg.infer.group_window
        self.store = torch.float16 if cfg.infer.dtype == "float16" else torch.float32
        self.autocast = functools.partial(device_autocast, precision, device)
        resize_on = cfg.infer.resize_on
        self.resize_on = resize_on if resize_on != "auto" else ("device" if device.type == "cuda" else "loader")
        self.device_wait = DeviceClock()

    def samples(self, rank: int, world: int, skips: SkipPolicy) -> Iterator[dict]:
        return infer_samples(self.cfg.data, self.cfg.infer, rank, world, skips=skips,
                             with_scales=self.resize_on == "loader")

    def batch_key(self, sample: dict) -> tuple[int, int]:
        return tuple(sample["image"].shape[-2:])

    def current(self, sample: dict, path: Path) -> tuple[bool, None]:
        return read_cam(path).weights_sha256 == self.weights_sha256, None

    def compute(self, group: list[dict]) -> list[Output]:
        flip = self.cfg.infer.flip
        size = tuple(group[0]["image"].shape[-2:])
        # per scale: the group's images, then (with infer.flip) their flips
        if self.resize_on == "device":
            images = torch.stack([s["image"] for s in group])
            if self.device.type == "cuda":
                images = images.pin_memory()  # so that the copy does not hold the host up
            per_scale = device_scales(images.to(self.device, non_blocking=True), self.cfg.infer.scales, flip,
                                      self.cfg.data.resize)
        else:
            per_scale = [torch.cat([s["scales"][i][0:1] for s in group] +
                                   ([s["scales"][i][1:2] for s in group] if flip else []))
                         for i in range(len(group[0]["scales"]))]
        high, strided = multiscale_cams(self.model, per_scale, size, self.device, self.channels_last,
                                        self.autocast, flip)
        # no wait for the device here: the maps travel to the host while the next group computes, and each
        # write waits for its own (the check for non-finite values too: nothing is written for a bad group)
        finite = torch.isfinite(high).all() & torch.isfinite(strided).all()
        kept = []
        for j, sample in enumerate(group):
            keys, (hr, st) = keep_positive(sample["labels"], high[j], strided[j])
            kept.append((keys, st.to(self.store), hr.to(self.store)))
        fetch = Fetch([finite, *(t for _, st, hr in kept for t in (st, hr))], self.device, self.device_wait)
        group_keys = [s["key"] for s in group]
        return [Output(sample["key"], self._writer(fetch, j, keys, group_keys))
                for j, (sample, (keys, _, _)) in enumerate(zip(group, kept))]

    def _writer(self, fetch: Fetch, j: int, keys: np.ndarray, group_keys: list[str]):
        """Writes image j of a group once its fetch has arrived; CheckpointError if the group's CAMs are
        not finite."""
        def write(f) -> None:
            finite, *maps = fetch.wait()
            if not bool(finite):
                raise CheckpointError(f"weights {weights_path(self.cfg)} give non-finite CAMs for image(s) "
                                      f"{', '.join(group_keys)} (infer.mixed_precision="
                                      f"{self.cfg.infer.mixed_precision} -> {self.precision}); nothing written "
                                      f"for them")
            st, hr = maps[2 * j], maps[2 * j + 1]
            cam_writer(CamRecord(keys, st.numpy(), hr.numpy(), self.weights_sha256))(f)
        return write

    def manifest(self) -> dict:
        return {"weights": str(weights_path(self.cfg)), "weights_sha256": self.weights_sha256,
                "mixed_precision": self.precision, "resize_on": self.resize_on,
                "cudnn": self.device.type == "cuda" and self.cfg.infer.cudnn,
                # on a GPU, computing counts the host's launching; the device's own time is mostly here
                "device_wait_s": round(self.device_wait.seconds, 3)}

    def report(self, ranks: list[dict], totals: dict, seconds: float, world: int) -> None:
        if self.device.type == "cuda":
            print(f"infer rank 0: its write threads waited {self.device_wait.seconds:.1f} s for the device's maps")
        if self.cfg.infer.legacy_dir:
            n = export_legacy(self.out_dir, Path(self.cfg.infer.legacy_dir))
            print(f"exported {n} CAMs in the pickled-dict .npy format to {self.cfg.infer.legacy_dir}")


def infer(cfg: Config) -> int:
    """Write CAMs for every image of cfg.data.infer_split, split over all ranks; returns 0, or
    PREEMPT_EXIT_CODE after SIGUSR1/SIGTERM (CAMs written so far are kept and skipped on rerun)."""
    state = distributed_state()
    device = state.device
    model, weights_sha256, model_cfg = load_cam_model(cfg, device)
    precision = resolve_precision(cfg.infer.mixed_precision, device)
    work = CamWork(cfg, model, weights_sha256, model_cfg, precision, device)
    if state.is_main_process:
        where = "on the device" if work.resize_on == "device" else "by the loader"
        print(f"infer: {precision_note(cfg.infer.mixed_precision, precision, device)}; scales made {where} "
              f"(infer.resize_on={cfg.infer.resize_on})"
              f"{'; without cuDNN (infer.cudnn=false)' if device.type == 'cuda' and not cfg.infer.cudnn else ''}",
              file=sys.stderr)
    # never cuDNN's per-shape search here: the split's hundreds of image sizes would each be timed anew
    with torch.backends.cudnn.flags(enabled=cfg.infer.cudnn, benchmark=False,
                                    deterministic=torch.backends.cudnn.deterministic,
                                    allow_tf32=torch.backends.cudnn.allow_tf32):
        return run_per_image(work, cfg.output.run_dir, cfg.data.on_corrupt, cfg.eval.max_listed)
