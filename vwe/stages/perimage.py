"""The per-image pass every file-per-image stage runs on (docs/architecture.md): CAMs, pseudo labels and
the later label and prediction passes give it only their per-image computation and their report.

What the pass guarantees, once for all of them:
- each image of the split exactly once over all ranks (contiguous ranges of the split's index);
- an image whose file was made from the same source (weights, CAM + settings) is not redone, an
  unreadable or outdated one is replaced; every file is written atomically;
- a bad input (a missing CAM, a corrupt sample under data.on_corrupt=error) is named, and every rank's
  bad inputs are listed together before anything is reported; skips (data.on_corrupt=skip) are counted
  and listed in the manifests and the report;
- writing overlaps computing (vwe.runtime.files.WriteQueue): what is counted as written is on disk;
- the run directory's lock is held; SIGTERM/SIGUSR1 stop after the batch in progress (exit 75: what was
  written stays and is skipped on rerun);
- one `manifest-rankNNN.json` per rank (what it wrote, from which source, how long it took: waiting for
  samples, computing, waiting for writes);
- a split with no images is an error, never an empty success.
"""
from __future__ import annotations

import functools
import json
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from vwe.data.loader import infer_ranges
from vwe.data.index import index_path, load_index
from vwe.runtime.dist import collective_call, distributed_state, gather_objects
from vwe.runtime.errors import DataError, problem_list
from vwe.runtime.files import WriteQueue, atomic_write
from vwe.runtime.lock import RunLock
from vwe.runtime.preempt import PREEMPT_EXIT_CODE, PreemptionFlag
from vwe.runtime.progress import Progress, timed_waits
from vwe.runtime.skips import SkipPolicy, unseen_after

Data = bytes | str | Callable[[BinaryIO], None]


@dataclass
class Output:
    """One image's result: its main file's content, further files (paths relative to the output folder),
    and the value `ImageWork.account` receives (e.g. the label map to score)."""
    key: str
    data: Data
    result: Any = None
    extra: dict[str, Data] = field(default_factory=dict)


class ImageWork:
    """What a stage gives the pass. Override `samples`, `compute` and `report`; the rest is optional."""
    name = "pass"            # the command (lock holder, progress, messages)
    what = "output"          # what one file is, in messages
    suffix = ".out"          # the file name is <id><suffix> in out_dir
    batch_size = 1           # images in one `compute` call, at most
    window = 0               # images that may wait to fill a group (0: batch_size)
    out_dir: Path
    split: str
    data_root: str
    manifest_dir: Path | None = None  # where manifests go; None: out_dir (a folder of outputs only, e.g. the
                                      # PASCAL test server's layout, keeps them elsewhere)

    def samples(self, rank: int, world: int, skips: SkipPolicy) -> Iterator[dict]:
        """This rank's samples of the split (the loader's dicts: at least `key`)."""
        raise NotImplementedError

    def prepare(self, sample: dict) -> dict:
        """Check one sample's inputs (DataError names what is wrong) and add what later steps need."""
        return sample

    def batch_key(self, sample: dict) -> Hashable:
        """Samples with equal keys may share one `compute` call."""
        return None

    def current(self, sample: dict, path: Path) -> tuple[bool, Any]:
        """Whether the existing file at `path` is up to date, and its result for `account` if it is."""
        return False, None

    def compute(self, samples: list[dict]) -> list[Output]:
        """The outputs of a group of prepared samples (one per sample)."""
        raise NotImplementedError

    def account(self, sample: dict, result: Any) -> None:
        """Fold one image's result (written now or found up to date) into this rank's totals."""

    def problems_heading(self, n: int) -> str:
        """The first line of the error that lists every bad input."""
        return f"`vwe {self.name}`: {n} bad input(s) for split '{self.split}'"

    def rank_totals(self) -> dict:
        """This rank's totals for the report (small, picklable)."""
        return {}

    def check_ranks(self, ranks: list[dict]) -> None:
        """On every rank, after the pass: raise if the ranks' results do not belong together."""

    def manifest(self) -> dict:
        """Fields of this rank's manifest besides counts and ids (e.g. the weights' SHA-256)."""
        return {}

    def report(self, ranks: list[dict], totals: dict, seconds: float, world: int) -> None:
        """On rank 0, after the pass: write and print the stage's report."""


class GroupBatcher:
    """Samples waiting for a `compute`, grouped by key, never more than `window` (default `batch_size`)
    in all.

    A group runs when it holds `batch_size` samples; a sample that would make the waiting samples exceed
    the window first sends the oldest group(s) to run. So memory is bounded by the window, whatever the
    number of distinct keys (on VOC many images have their own size); a wider window fills more batches.
    """

    def __init__(self, batch_size: int, window: int = 0):
        self.batch_size, self.window = batch_size, max(window or batch_size, batch_size)
        self.groups: OrderedDict[Hashable, list[dict]] = OrderedDict()  # oldest group first
        self.pending = 0
        self.max_pending = 0

    def add(self, key: Hashable, sample: dict) -> list[list[dict]]:
        """Queue one sample; returns the groups to run now, oldest first."""
        ready = []
        while self.pending + 1 > self.window:
            ready.append(self._pop(next(iter(self.groups))))
        self.groups.setdefault(key, []).append(sample)
        self.pending += 1
        self.max_pending = max(self.max_pending, self.pending)
        if len(self.groups[key]) >= self.batch_size:
            ready.append(self._pop(key))
        return ready

    def drain(self) -> Iterator[list[dict]]:
        """The remaining groups, oldest first (taken one at a time, so a caller may stop between them)."""
        while self.groups:
            yield self._pop(next(iter(self.groups)))

    def _pop(self, key: Hashable) -> list[dict]:
        group = self.groups.pop(key)
        self.pending -= len(group)
        return group


COUNTS = ("written", "already_done", "stale_replaced")


def run_per_image(work: ImageWork, run_dir: str | Path, on_corrupt: str, max_listed: int = 20) -> int:
    """Run `work` over its split on every rank; returns 0, or PREEMPT_EXIT_CODE after a signal."""
    state = distributed_state()
    lock = RunLock(run_dir, f"vwe {work.name}")
    note = collective_call(lambda: lock.acquire().note, main_only=True)
    preempt = PreemptionFlag().install()
    try:
        if note and state.is_main_process:
            print(note, file=sys.stderr)
        return _run(work, state, on_corrupt, max_listed, preempt)
    finally:
        preempt.restore()
        if state.is_main_process:
            lock.release()


def _per_call(images_per_compute: float | None) -> str:
    return "nothing to compute" if images_per_compute is None else f"{images_per_compute:.1f} images per call"


def _expected_keys(work: ImageWork, rank: int, world: int) -> tuple[list[str], int]:
    idx = load_index(work.data_root, work.split)
    if idx.num_samples == 0:
        raise DataError(f"split '{work.split}' has no images ({index_path(work.data_root, work.split)}): "
                        f"nothing for `vwe {work.name}` to do")
    lo, hi = infer_ranges(idx.num_samples, world)[rank]
    return idx.keys[lo:hi], idx.num_samples


def _run(work: ImageWork, state, on_corrupt: str, max_listed: int, preempt: PreemptionFlag) -> int:
    rank, world = state.process_index, state.num_processes
    expected, total = _expected_keys(work, rank, world)
    out_dir = work.out_dir
    manifest_dir = work.manifest_dir or out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest_dir.mkdir(parents=True, exist_ok=True)
    if state.is_main_process:  # manifests of an earlier launch with more processes would mislead
        for old in manifest_dir.glob("manifest-rank*.json"):
            if int(old.stem[len("manifest-rank"):]) >= world:
                old.unlink()
    counts = dict.fromkeys(COUNTS, 0)
    written: list[str] = []
    problems: list[str] = []
    skips = SkipPolicy(on_corrupt, what="image")
    batcher = GroupBatcher(work.batch_size, work.window)
    progress = Progress(f"{work.name} rank {rank}", total=len(expected), enabled=state.is_main_process)
    start = time.perf_counter()

    writes = WriteQueue(depth=max(8, 2 * work.batch_size))

    def wrote(sample: dict, out: Output) -> None:
        work.account(sample, out.result)
        written.append(out.key)
        counts["written"] += 1

    phases = {"data": 0.0, "compute": 0.0}  # this rank's seconds waiting for samples and computing

    def waited(seconds: float) -> None:
        phases["data"] += seconds

    computes = 0  # compute calls: written / computes is how full the batches were

    def run(group: list[dict]) -> None:
        nonlocal computes
        t0 = time.perf_counter()
        outputs = work.compute(group)
        phases["compute"] += time.perf_counter() - t0
        computes += 1
        by_key = {s["key"]: s for s in group}
        for out in outputs:
            files = [(out_dir / f"{out.key}{work.suffix}", out.data),
                     *((out_dir / rel, data) for rel, data in out.extra.items())]
            writes.submit(files, work.what, functools.partial(wrote, by_key[out.key], out))

    try:
        for sample in timed_waits(unseen_after(work.samples(rank, world, skips), expected, skips), waited):
            if preempt.requested:
                break
            try:
                sample = work.prepare(sample)
            except DataError as e:
                problems.append(str(e))
            if problems:  # the pass fails: only check the rest, so the error lists every bad input
                progress.update(1)
                continue
            path = out_dir / f"{sample['key']}{work.suffix}"
            if path.exists():
                try:
                    done, result = work.current(sample, path)
                except DataError:
                    done, result = False, None  # unreadable leftovers are redone
                if done:
                    counts["already_done"] += 1
                    work.account(sample, result)
                    progress.update(1)
                    continue
                counts["stale_replaced"] += 1
            for group in batcher.add(work.batch_key(sample), sample):
                if preempt.requested:  # stop after the batch that was running when the signal came
                    break
                run(group)
            progress.update(1)
        for group in batcher.drain():
            if preempt.requested or problems:
                break
            run(group)
        writes.drain()  # what was computed is on disk before anything is reported
    finally:
        writes.close()
    progress.close()
    if preempt.requested:
        # no collective here: the other ranks stop on their own signal; a rerun skips what is done
        print(f"{work.name} rank {rank}: preempted (signal {preempt.signal}) after writing {counts['written']} "
              f"{work.what}(s); exiting with code {PREEMPT_EXIT_CODE}")
        return PREEMPT_EXIT_CODE

    ranks = gather_objects({"counts": counts, "skips": skips.state(), "problems": problems, "totals": work.rank_totals()})
    every = [p for part in ranks for p in part["problems"]]
    if every:
        raise DataError(problem_list(work.problems_heading(len(every)), every, max_listed))
    work.check_ranks([p["totals"] for p in ranks])
    seconds = time.perf_counter() - start
    phases["waiting_for_writes"] = writes.waited
    manifest = {"stage": work.name, "rank": rank, "world": world, "split": work.split, **work.manifest(),
                "seconds": round(seconds, 3), "seconds_by_phase": {k: round(v, 3) for k, v in phases.items()},
                **counts, "max_pending_images": batcher.max_pending, "computes": computes,
                "images_per_compute": round(counts["written"] / computes, 3) if computes else None,
                "skipped": skips.report(), "ids": sorted(written)}
    atomic_write(manifest_dir / f"manifest-rank{rank:03d}.json", json.dumps(manifest, indent=1), f"{work.name} manifest")
    if state.is_main_process:
        totals = {k: sum(p["counts"][k] for p in ranks) for k in COUNTS}
        skips.merge(p["skips"] for p in ranks)
        totals["skipped"] = skips.total
        totals["images"] = total
        print(f"{work.name} on '{work.split}' over {world} process(es): {totals['written']} written, "
              f"{totals['already_done']} already done, {totals['stale_replaced']} replaced -> {out_dir}")
        print(f"{work.name} rank 0: {seconds:.1f} s, of which waiting for samples {phases['data']:.1f} s, "
              f"computing {phases['compute']:.1f} s ({_per_call(manifest['images_per_compute'])}), "
              f"waiting for writes {phases['waiting_for_writes']:.1f} s")
        if skips.total:
            print(skips.summary(f"over {world} process(es)") + "; ids in the manifests")
        work.report([p["totals"] for p in ranks], {**totals, "skips": skips.report()}, seconds, world)
    state.wait_for_everyone()
    return 0
