"""Training and inference loaders over the shards, split by rank (and by loader worker) here.

Training: in each epoch each rank reads an endless stream of shards (the epoch's shard order, repeated
with fresh permutations, rank r taking every world-th shard), shuffles raw samples in a buffer, and cuts
the stream into micro-batches. The content of micro-batch j is a function of (seed, epoch, rank, world, j)
alone: every loader worker replays the same raw stream (cheap: bytes, no decoding) and decodes only its
own batches, so results do not depend on the worker count and `start_batch=k` resumes exactly.
A sample's augmentation draws from (seed, epoch, key) only. One stream may run through several epochs
(the Trainer's does): the same workers go on into the next epoch with their prefetch full, and every
epoch's batches are the ones a stream of that epoch alone would give.

Inference: the split's samples, in index order, are cut into one contiguous range per rank and then per
worker: every sample exactly once over all ranks, for any world size and shard count.
"""
from __future__ import annotations

import itertools
import signal
import time
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vwe.data.index import SplitIndex, load_index
from vwe.data.reading import RawSample, read_shard, remember_members, verify_shards
from vwe.data.transforms import irn_augment, load_rgb, open_jpeg, resize_pair, sample_rng, seg_augment, train_augment
from vwe.data.voc import NUM_CLASSES, decode_mask
from vwe.formats.config import DataConfig, InferConfig, TrainConfig
from vwe.runtime.errors import DataError, VweError
from vwe.runtime.parallel import ordered_map
from vwe.runtime.preempt import PREEMPT_SIGNALS
from vwe.runtime.skips import Skip, SkipPolicy

_ERROR = "__vwe_data_error__"


def _index(data: DataConfig, split: str) -> SplitIndex:
    """The index of `split` under data.root, its shards checked first when data.verify_shards."""
    idx = load_index(data.root, split)
    if data.verify_shards:
        verify_shards(idx)
    return idx


def steps_per_epoch(data: DataConfig, train: TrainConfig) -> int:
    """Optimizer steps per epoch: len(data.train_split) // train.batch_size (drop_last)."""
    n = load_index(data.root, data.train_split).num_samples
    steps = n // train.batch_size
    if steps == 0:
        raise VweError(f"split '{data.train_split}' has {n} samples, fewer than one batch "
                       f"(train.batch_size = {train.batch_size})")
    return steps


def micro_batch_size(train: TrainConfig, world: int) -> int:
    """Samples per micro-batch on one rank: batch_size // (world * grad_accum), which must divide evenly."""
    b, acc = train.batch_size, train.grad_accum
    if b % (world * acc):
        raise VweError(f"train.batch_size ({b}) must be divisible by world size x train.grad_accum "
                       f"({world} x {acc})")
    return b // (world * acc)


def _labels_vec(labels: list[int]) -> torch.Tensor:
    v = torch.zeros(NUM_CLASSES, dtype=torch.float32)
    v[labels] = 1.0
    return v


def _shard_order(n_shards: int, seed: int, epoch: int, rank: int, world: int) -> Iterator[int]:
    """Endless shard sequence of one rank: per cycle a fresh permutation, rank r takes every world-th."""
    pos, cycle = 0, 0
    while True:
        perm = np.random.default_rng([seed, epoch, cycle, 0x5A4D]).permutation(n_shards)
        for s in perm:
            if pos % world == rank:
                yield int(s)
            pos += 1
        cycle += 1


class _TrainStream(IterableDataset):
    """One rank's micro-batches g = start, start + 1, ... (below `stop`; None: without end), counted
    over epochs from `epoch` on: g is micro-batch g % per_epoch of epoch epoch + g // per_epoch. Worker w
    of n makes the g with (g - start) % n == w, the round-robin order in which a DataLoader collects them."""

    def __init__(self, data: DataConfig, seed: int, index: SplitIndex, rank: int, world: int, epoch: int,
                 start: int, stop: int | None, per_epoch: int, batch: int,
                 seg_scales: tuple[float, ...] | None = None, irn: tuple[float, float] | None = None):
        self.d, self.index, self.seg_scales, self.irn = data, index, seg_scales, irn
        self.skips = SkipPolicy(data.on_corrupt)  # decides in the workers; the main process records
        self.seed, self.rank, self.world, self.epoch = seed, rank, world, epoch
        self.start, self.stop, self.per_epoch, self.batch = start, stop, per_epoch, batch

    def _raw(self, epoch: int) -> Iterator[RawSample]:
        """This rank's shuffled raw-sample stream of one epoch (identical in every worker)."""
        shards = self.index.shards
        rng = np.random.default_rng([self.seed, epoch, self.rank, self.world, 0xB0F])
        buf: list[RawSample] = []
        size = self.d.shuffle_buffer
        for s in _shard_order(len(shards), self.seed, epoch, self.rank, self.world):
            for raw in read_shard(self.index, shards[s], self.d.verify_shards):
                if size <= 1:
                    yield raw
                    continue
                if len(buf) < size:
                    buf.append(raw)
                    continue
                i = int(rng.integers(size))
                buf[i], raw = raw, buf[i]
                yield raw

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        try:
            yield from self._batches(wid, nw)
        except DataError as e:
            yield {_ERROR: str(e)}

    def _batches(self, wid: int, nw: int) -> Iterator[dict]:
        for task in self.plan(wid, nw):
            yield self.decode(*task)

    def plan(self, wid: int, nw: int) -> Iterator[tuple[int, int, list[RawSample], list[Skip]]]:
        """(epoch, j, raw samples, skips) for the micro-batches this worker makes (no decoding)."""
        g = self.start + wid  # this worker's next micro-batch
        while self.stop is None or g < self.stop:
            k = g // self.per_epoch
            end = (k + 1) * self.per_epoch if self.stop is None else min((k + 1) * self.per_epoch, self.stop)
            mine = range(g - k * self.per_epoch, end - k * self.per_epoch, nw)
            yield from self._epoch_plan(self.epoch + k, mine)
            g += len(mine) * nw

    def _epoch_plan(self, epoch: int, mine: range) -> Iterator[tuple[int, int, list[RawSample], list[Skip]]]:
        """(epoch, j, raw samples, skips) for the micro-batches j in `mine` (not empty) of one epoch:
        its raw stream replayed from the start up to the last of them."""
        stream = self._raw(epoch)
        bad_run, n_samples = 0, self.index.num_samples
        for j in range(mine[-1] + 1):
            samples, skips = [], []
            while len(samples) < self.batch:
                raw = next(stream)
                if raw.error is not None:
                    skip = self.skips.decide(raw.key, raw.error)  # raises under data.on_corrupt=error
                    bad_run += 1
                    if bad_run > n_samples:
                        raise DataError(f"split '{self.index.split}': no usable sample in {n_samples} "
                                        f"consecutive samples (last: {raw.error})")
                    if j in mine:
                        skips.append(skip)
                    continue
                bad_run = 0
                samples.append(raw)
            if j in mine:
                yield epoch, j, samples, skips

    def decode(self, epoch: int, j: int, samples: list[RawSample], skips: list[Skip]) -> dict:
        """Micro-batch j of `epoch` from its raw samples (a corrupt one is refilled from the batch in skip
        mode)."""
        cpu_start = time.thread_time()  # this worker's CPU time for the batch: decode + augmentation
        crop = self.d.crop_size
        b = len(samples)
        image = _batch_tensor((b, 3, crop, crop))
        side = irn_label_side(crop) if self.irn is not None else crop
        target = _batch_tensor((b, side, side)) if self.seg_scales is not None or self.irn is not None else None
        ok = [False] * b
        for i, raw in enumerate(samples):
            where = f"shard {raw.shard}, sample {raw.key!r}"
            rng = sample_rng(self.seed, epoch, raw.key)
            try:
                if target is None:
                    train_augment(raw.jpg, rng, tuple(self.d.long_side), crop, self.d.flip, image[i], where,
                                  raw.mask, self.d.resize)
                elif raw.target is None:
                    raise DataError(f"{where}: no segmentation target ({raw.key}.target.png): train on a split "
                                    f"made by `vwe prepare --labels-from`")
                elif self.irn is not None:
                    irn_augment(raw.jpg, raw.target, rng, self.irn, crop, self.d.flip, image[i], target[i], where)
                else:
                    seg_augment(raw.jpg, raw.target, rng, self.seg_scales, crop, self.d.flip,
                                image[i], target[i], where)
                ok[i] = True
            except DataError as e:
                skips = [*skips, self.skips.decide(raw.key, str(e))]  # raises under data.on_corrupt=error
        keys = [s.key for s in samples]
        labels = [s.labels for s in samples]
        if not all(ok):
            # refill a corrupt slot with a good sample of the same batch, chosen deterministically
            good = [i for i in range(b) if ok[i]]
            if not good:
                raise DataError(f"micro-batch {j} of epoch {epoch} (rank {self.rank}): every sample is "
                                f"corrupt ({', '.join(keys)})")
            rng = np.random.default_rng([self.seed, epoch, self.rank, j, 0xBAD])
            for i in range(b):
                if not ok[i]:
                    g = good[int(rng.integers(len(good)))]
                    image[i] = image[g]
                    if target is not None:
                        target[i] = target[g]
                    keys[i], labels[i] = keys[g], labels[g]
        out = {"image": image, "labels": torch.stack([_labels_vec(l) for l in labels]), "key": keys,
               "skips": skips, "skipped": len(skips), "cpu_s": time.thread_time() - cpu_start}
        if target is not None:
            out["target"] = target
        return out


def irn_label_side(crop: int) -> int:
    """The side of a relation-label crop at stride 4 (IRNet's pil_rescale by 0.25: rounded)."""
    return int(np.round(crop / 4))


def _batch_tensor(shape: tuple[int, ...]) -> torch.Tensor:
    """A uint8 tensor; inside a loader worker it is made in shared memory, so handing it to the main
    process costs no copy (as DataLoader's own collate does)."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=torch.uint8)
    storage = torch.UntypedStorage._new_shared(int(np.prod(shape)))
    return torch.empty(0, dtype=torch.uint8).set_(storage).view(shape)


def _ignore_preemption_signals(worker_id: int) -> None:
    """worker_init_fn: loader workers ignore SIGUSR1/SIGTERM. SLURM and slurm/launch.sh signal every
    process of the job; only the main process decides when to stop (after its checkpoint), and a worker
    killed first would make it fail instead. Workers still end with their parent (torch's watchdog)."""
    for sig in PREEMPT_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def _run(dataset: IterableDataset, num_workers: int, kind: str = "process") -> Iterator[Any]:
    """Iterate in this process (0 workers), on threads, or through a DataLoader's worker processes;
    worker errors re-raise as DataError."""
    if num_workers > 0 and kind == "thread":
        yield from ordered_map(lambda task: dataset.decode(*task), dataset.plan(0, 1), num_workers, "vwe-data")
        return
    if num_workers == 0:
        it: Any = iter(dataset)
    else:
        it = iter(DataLoader(dataset, batch_size=None, num_workers=num_workers, pin_memory=torch.cuda.is_available(),
                             prefetch_factor=2, persistent_workers=False,
                             worker_init_fn=_ignore_preemption_signals))
    try:
        for item in it:
            if _ERROR in item:
                raise DataError(item[_ERROR])
            yield item
    finally:
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


def train_batches(data: DataConfig, train: TrainConfig, rank: int, world: int, epoch: int, start_batch: int = 0,
                  *, epochs: int | None = 1, skips: SkipPolicy | None = None,
                  seg_scales: tuple[float, ...] | None = None,
                  irn: tuple[float, float] | None = None) -> Iterator[dict]:
    """This rank's micro-batches from micro-batch `start_batch` of `epoch` on, through `epochs` epochs
    (None: without end), all from one set of loader workers (see module doc).

    An epoch is steps_per_epoch(data, train) * train.grad_accum micro-batches; the first one yields
    those from `start_batch` on (none when start_batch is that number: the stream starts at the next
    epoch), each later one all of them, exactly as a stream of that epoch alone would. Dicts: `image`
    uint8 (B,3,S,S), `labels` float32 (B,20), with `seg_scales` (a segmentation split, seg_augment) also
    `target` uint8 (B,S,S), with `irn` (a relation-label split, irn_augment with that scale range) `target`
    uint8 (B,S/4,S/4), `key` list[str], `skips` the corrupt samples skipped while making this batch
    (only with data.on_corrupt = skip; recorded into `skips` when given) and `skipped` their number.
    """
    if not 0 <= rank < world:
        raise VweError(f"rank {rank} outside world size {world}")
    if epochs is not None and epochs < 1:
        raise VweError(f"epochs {epochs}: at least 1, or None for a stream without end")
    idx = _index(data, data.train_split)
    per_epoch = steps_per_epoch(data, train) * train.grad_accum
    if not 0 <= start_batch <= per_epoch:
        raise VweError(f"start_batch {start_batch} outside 0..{per_epoch}")
    stop = None if epochs is None else epochs * per_epoch
    ds = _TrainStream(data, train.seed, idx, rank, world, epoch, start_batch, stop, per_epoch,
                      micro_batch_size(train, world), seg_scales, irn)
    workers = data.num_workers if stop is None else min(data.num_workers, stop - start_batch)
    if workers and data.worker_kind == "process":
        # let the worker processes inherit the member offsets of this rank's first shards (read once
        # here) instead of each parsing every tar header again
        n, first = len(idx.shards), epoch + start_batch // per_epoch
        first_cycle = itertools.islice(_shard_order(n, train.seed, first, rank, world), -(-n // world))
        remember_members(idx, [idx.shards[i] for i in first_cycle])
    policy = skips if skips is not None else SkipPolicy(data.on_corrupt)
    for batch in _run(ds, workers, data.worker_kind):
        for skip in batch["skips"]:
            policy.record(skip)
        yield batch


class _InferStream(IterableDataset):
    """The samples [lo, hi) of a split in index order, cut into one contiguous range per worker."""

    def __init__(self, data: DataConfig, infer: InferConfig, index: SplitIndex, lo: int, hi: int,
                 with_scales: bool, with_image: bool = True):
        self.index, self.lo, self.hi = index, lo, hi
        self.with_image = with_image or with_scales
        self.scales = list(infer.scales) if with_scales else None
        self.flip = infer.flip
        self.resize = data.resize
        self.verify = data.verify_shards
        self.skips = SkipPolicy(data.on_corrupt, what="image")

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        try:
            yield from _count_skips(self.decode(*task) for task in self.plan(wid, nw))
        except DataError as e:
            yield {_ERROR: str(e)}

    def plan(self, wid: int, nw: int) -> Iterator[tuple[RawSample]]:
        """The raw samples of this worker's share of [lo, hi), in index order."""
        n = self.hi - self.lo
        lo, hi = self.lo + wid * n // nw, self.lo + (wid + 1) * n // nw
        pos = 0
        for shard in self.index.shards:
            if pos + shard.count <= lo or pos >= hi:
                pos += shard.count
                continue
            for raw in read_shard(self.index, shard, self.verify):
                if lo <= pos < hi:
                    yield (raw,)
                pos += 1

    def decode(self, raw: RawSample) -> dict | Skip:
        """The sample's tensors; a Skip when it is corrupt and data.on_corrupt is skip."""
        try:
            if raw.error is not None:
                raise DataError(raw.error)
            return self._decode(raw)
        except DataError as e:
            return self.skips.decide(raw.key, str(e))  # raises under data.on_corrupt=error

    def _decode(self, raw: RawSample) -> dict:
        where = f"shard {raw.shard}, sample {raw.key!r}"
        im = open_jpeg(raw.jpg, where)  # lazy: the header gives the size without decoding the pixels
        if self.with_image:
            im = load_rgb(im, where)
        w, h = im.size
        mask = None
        if raw.mask is not None:
            m = decode_mask(raw.mask, where)
            if m.shape != (h, w):
                raise DataError(f"{where}: mask is {m.shape[1]}x{m.shape[0]} but the image is {w}x{h}")
            mask = torch.from_numpy(m.copy())
        out = {"key": raw.key, "size": (h, w), "labels": _labels_vec(raw.labels), "mask": mask}
        if self.with_image:
            out["image"] = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)
        if self.scales is not None:
            out["scales"] = [resize_pair(im, s, self.flip, self.resize) for s in self.scales]
        return out


def infer_ranges(n: int, world: int) -> list[tuple[int, int]]:
    """Contiguous [lo, hi) sample ranges, one per rank, covering 0..n exactly once."""
    return [(r * n // world, (r + 1) * n // world) for r in range(world)]


def infer_samples(data: DataConfig, infer: InferConfig, rank: int, world: int, split: str | None = None,
                  with_scales: bool = True, with_image: bool = True,
                  skips: SkipPolicy | None = None) -> Iterator[dict]:
    """Every sample of `split` (default data.infer_split) exactly once over all ranks.

    Dicts: `key` str, `size` (H, W), `image` uint8 (3,H,W) (unless with_image is false: evaluation needs
    only masks, and the JPEG is then not decoded), `labels` float32 (20,), `mask` uint8 (H,W) or None,
    `scales` (with_scales) a list, one per infer.scales, of uint8 (2,3,h,w): the resized image and its
    horizontal flip ((1,3,h,w) when infer.flip is false), `skips` the corrupt samples skipped just
    before this one (only with data.on_corrupt = skip; recorded into `skips` when given, as are the
    ones after the last sample) and `skipped` their number.
    """
    if not 0 <= rank < world:
        raise VweError(f"rank {rank} outside world size {world}")
    idx = _index(data, split or data.infer_split)
    lo, hi = infer_ranges(idx.num_samples, world)[rank]
    ds = _InferStream(data, infer, idx, lo, hi, with_scales, with_image)
    workers = min(infer.num_workers, max(hi - lo, 1)) if hi > lo else 0
    if workers and data.worker_kind == "thread":
        items = _count_skips(ordered_map(lambda task: ds.decode(*task), ds.plan(0, 1), workers, "vwe-data"))
    else:
        items = _run(ds, workers)
    for item in items:
        for skip in item["skips"]:
            if skips is not None:
                skips.record(skip)
        if _SKIPS_ONLY not in item:
            yield item


_SKIPS_ONLY = "__skips_only__"  # carries the skips after a loader's last sample


def _count_skips(samples: Iterator[dict | Skip]) -> Iterator[dict]:
    """Drop skipped samples, attaching the Skips that went before each kept one as its `skips`."""
    pending: list[Skip] = []
    for s in samples:
        if isinstance(s, Skip):
            pending.append(s)
            continue
        yield {**s, "skips": pending, "skipped": len(pending)}
        pending = []
    if pending:
        yield {_SKIPS_ONLY: True, "skips": pending}
