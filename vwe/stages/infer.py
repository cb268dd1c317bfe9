"""Multi-scale + flip CAM inference (docs/method.md), each rank on a disjoint part of the split.

Only the CAM path runs (backbone + classifier). Images of equal size are batched with their flips; at
most infer.batch_size images wait in memory, however many distinct sizes the split has.
One `<id>.npz` per image is written atomically; a re-run skips images already done with the same
weights; every rank records what it wrote, and from which weights, in a manifest.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import sys
import time
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from vwe.formats.cams import CamRecord, cam_dir_for, export_legacy, read_cam, write_cam
from vwe.formats.checkpoint import FINAL_WEIGHTS_NAME, META, check_compatible, load_weights, read_meta
from vwe.formats.config import Config, ModelConfig, config_from_dict
from vwe.data.loader import infer_ranges, infer_samples
from vwe.data.shards import load_index
from vwe.data.transforms import normalize
from vwe.runtime.device import autocast as device_autocast, precision_note, resolve_precision
from vwe.runtime.dist import collective_call, distributed_state, gather_objects
from vwe.runtime.errors import CheckpointError, DataError
from vwe.runtime.files import atomic_write, file_sha256
from vwe.nets.backbone import FROZEN_NORMS, fold_frozen_bn
from vwe.nets.cam import build_model
from vwe.runtime.preempt import PREEMPT_EXIT_CODE, PreemptionFlag
from vwe.runtime.lock import RunLock
from vwe.runtime.skips import SkipPolicy, unseen_after


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


def keep_positive(cam: torch.Tensor, labels: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
    """Channels of the positive classes, each divided by its own maximum + 1e-5."""
    keys = torch.nonzero(labels > 0.5).flatten()
    kept = cam[keys.to(cam.device)]
    kept = kept / (kept.flatten(1).amax(dim=1).view(-1, 1, 1) + 1e-5)
    return keys.cpu().numpy().astype(np.int64), kept


class SizeBatcher:
    """Images waiting for a forward, grouped by size, never more than `batch_size` in all.

    A group runs when it holds `batch_size` images; an image that would make the waiting images exceed
    `batch_size` first sends the oldest group(s) to run. So memory is bounded by the batch, whatever the
    number of distinct sizes (on VOC nearly every image has its own).
    """

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self.groups: OrderedDict[tuple[int, int], list[dict]] = OrderedDict()  # oldest group first
        self.pending = 0
        self.max_pending = 0

    def add(self, size: tuple[int, int], sample: dict) -> list[list[dict]]:
        """Queue one image; returns the groups to run now, oldest first."""
        ready = []
        while self.pending + 1 > self.batch_size:
            ready.append(self._pop(next(iter(self.groups))))
        self.groups.setdefault(size, []).append(sample)
        self.pending += 1
        self.max_pending = max(self.max_pending, self.pending)
        if len(self.groups[size]) >= self.batch_size:
            ready.append(self._pop(size))
        return ready

    def drain(self) -> Iterator[list[dict]]:
        """The remaining groups, oldest first (taken one at a time, so a caller may stop between them)."""
        while self.groups:
            yield self._pop(next(iter(self.groups)))

    def _pop(self, size: tuple[int, int]) -> list[dict]:
        group = self.groups.pop(size)
        self.pending -= len(group)
        return group


def _range_keys(cfg: Config, rank: int, world: int) -> list[str]:
    """The ids this rank is given by the loader (infer_samples), from the split's index."""
    idx = load_index(cfg.data.root, cfg.data.infer_split)
    lo, hi = infer_ranges(idx.num_samples, world)[rank]
    return idx.keys[lo:hi]


def infer(cfg: Config) -> int:
    """Write CAMs for every image of cfg.data.infer_split, split over all ranks; returns 0, or
    PREEMPT_EXIT_CODE after SIGUSR1/SIGTERM (CAMs written so far are kept and skipped on rerun)."""
    state = distributed_state()
    device = state.device
    model, weights_hash, model_cfg = load_cam_model(cfg, device)
    precision = resolve_precision(cfg.infer.mixed_precision, device)
    lock = RunLock(cfg.output.run_dir, "vwe infer")
    note = collective_call(lambda: lock.acquire().note, main_only=True)
    preempt = PreemptionFlag().install()
    try:
        if state.is_main_process:
            print(f"infer: {precision_note(cfg.infer.mixed_precision, precision, device)}" +
                  (f"\n{note}" if note else ""), file=sys.stderr)
        return _infer(cfg, state, model, weights_hash, model_cfg, precision, preempt)
    finally:
        preempt.restore()
        if state.is_main_process:
            lock.release()


def _infer(cfg: Config, state, model: torch.nn.Module, weights_hash: str, model_cfg: ModelConfig,
           precision: str, preempt: PreemptionFlag) -> int:
    device, rank, world = state.device, state.process_index, state.num_processes
    out_dir = cam_dir_for(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    if state.is_main_process:  # manifests of an earlier launch with more processes would mislead
        for old in out_dir.glob("manifest-rank*.json"):
            if int(old.stem[len("manifest-rank"):]) >= world:
                old.unlink()
    store = np.float16 if cfg.infer.dtype == "float16" else np.float32
    autocast = functools.partial(device_autocast, precision, device)
    channels_last = model_cfg.channels_last
    counts = {"written": 0, "already_done": 0, "stale_replaced": 0}
    written: list[str] = []
    batcher = SizeBatcher(cfg.infer.batch_size)
    skips = SkipPolicy.from_config(cfg, what="image")
    start = time.perf_counter()

    def run(group: list[dict]) -> None:
        size = tuple(group[0]["image"].shape[-2:])
        # per scale: the group's images, then (with infer.flip) their flips
        per_scale = [torch.cat([s["scales"][i][0:1] for s in group] +
                               ([s["scales"][i][1:2] for s in group] if cfg.infer.flip else []))
                     for i in range(len(group[0]["scales"]))]
        high, strided = multiscale_cams(model, per_scale, size, device, channels_last, autocast, cfg.infer.flip)
        if not (torch.isfinite(high).all() and torch.isfinite(strided).all()):
            keys = ", ".join(s["key"] for s in group)
            raise CheckpointError(f"weights {weights_path(cfg)} give non-finite CAMs for image(s) {keys} "
                                  f"(infer.mixed_precision={cfg.infer.mixed_precision} -> {precision}); nothing written "
                                  f"for them")
        for j, sample in enumerate(group):
            keys, hr = keep_positive(high[j], sample["labels"])
            _, st = keep_positive(strided[j], sample["labels"])
            write_cam(out_dir / f"{sample['key']}.npz",
                      CamRecord(keys, st.cpu().numpy().astype(store), hr.cpu().numpy().astype(store), weights_hash))
            written.append(sample["key"])
            counts["written"] += 1

    bar = tqdm(desc=f"infer rank {rank}", disable=not state.is_main_process, unit="img", dynamic_ncols=True)
    samples = unseen_after(infer_samples(cfg, rank, world, skips=skips), _range_keys(cfg, rank, world), skips)
    for sample in samples:
        if preempt.requested:
            break
        path = out_dir / f"{sample['key']}.npz"
        if path.exists():
            try:
                done = read_cam(path).weights_sha256 == weights_hash
            except DataError:
                done = False  # unreadable leftovers are recomputed
            if done:
                counts["already_done"] += 1
                bar.update(1)
                continue
            counts["stale_replaced"] += 1
        for group in batcher.add(tuple(sample["image"].shape[-2:]), sample):
            if preempt.requested:  # stop after the batch that was running when the signal came
                break
            run(group)
        bar.update(1)
    for group in batcher.drain():
        if preempt.requested:
            break
        run(group)
    bar.close()
    if preempt.requested:
        # no collective here: the other ranks stop on their own signal; a requeued run skips what is done
        print(f"infer rank {rank}: preempted (signal {preempt.signal}) after writing {counts['written']} CAM(s); "
              f"exiting with code {PREEMPT_EXIT_CODE}")
        return PREEMPT_EXIT_CODE

    seconds = time.perf_counter() - start
    manifest = {"rank": rank, "world": world, "split": cfg.data.infer_split, "weights": str(weights_path(cfg)),
                "weights_sha256": weights_hash, "mixed_precision": precision, "seconds": round(seconds, 3),
                **counts,
                "max_pending_images": batcher.max_pending, "skipped": skips.report(), "ids": sorted(written)}
    atomic_write(out_dir / f"manifest-rank{rank:03d}.json", json.dumps(manifest, indent=1), "inference manifest")
    totals = gather_objects({**counts, "skips": skips.state()})
    if state.is_main_process:
        total = {k: sum(t[k] for t in totals) for k in counts}
        skips.merge(t["skips"] for t in totals)
        print(f"inference on '{cfg.data.infer_split}' over {world} process(es): {total['written']} written, "
              f"{total['already_done']} already done, {total['stale_replaced']} from other weights replaced "
              f"-> {out_dir}")
        if skips.total:
            print(skips.summary(f"over {world} process(es)") + "; ids in the manifests")
        if cfg.infer.legacy_dir:
            n = export_legacy(out_dir, Path(cfg.infer.legacy_dir))
            print(f"exported {n} CAMs in the pickled-dict .npy format to {cfg.infer.legacy_dir}")
    state.wait_for_everyone()
    return 0
