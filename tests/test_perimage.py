"""The per-image pass (vwe/stages/perimage.py) in one process, with a small work of its own over real shards:
rank split, skip-if-current, atomic outputs and manifest, bad inputs listed together, an empty split
refused, SIGUSR1 stops after the batch in progress with exit 75, batching by key within the bound."""
import json
import os
import shutil
import signal
from pathlib import Path

import pytest

from vwe.data.loader import infer_samples
from vwe.data.index import load_index, write_index
from vwe.formats.config import load_config
from vwe.runtime.errors import DataError
from vwe.runtime.preempt import PREEMPT_EXIT_CODE
from vwe.stages.perimage import GroupBatcher, ImageWork, Output, run_per_image

REPO = Path(__file__).resolve().parents[1]


class SizeWork(ImageWork):
    """Writes each image's size and a version tag; groups by size."""
    name, what, suffix = "sizes", "size file", ".txt"

    def __init__(self, root: Path, out_dir: Path, version: str = "v1", batch_size: int = 3,
                 bad: set[str] = frozenset(), stop_after: int | None = None):
        self.cfg = load_config(REPO / "configs" / "demo.yaml",
                               [f"data.root={root}", "data.infer_split=train", "infer.num_workers=0"])
        self.data_root, self.split, self.out_dir = str(root), "train", out_dir
        self.version, self.batch_size, self.bad, self.stop_after = version, batch_size, bad, stop_after
        self.groups: list[list[str]] = []
        self.accounted: dict[str, str] = {}

    def samples(self, rank, world, skips):
        return infer_samples(self.cfg.data, self.cfg.infer, rank, world, with_scales=False, with_image=False,
                             skips=skips)

    def prepare(self, sample):
        if sample["key"] in self.bad:
            raise DataError(f"input of {sample['key']} is bad")
        return sample

    def batch_key(self, sample):
        return sample["size"]

    def current(self, sample, path):
        text = path.read_text()
        return text.endswith(self.version), text

    def compute(self, samples):
        self.groups.append([s["key"] for s in samples])
        if self.stop_after is not None and sum(map(len, self.groups)) >= self.stop_after:
            os.kill(os.getpid(), signal.SIGUSR1)
        return [Output(s["key"], f"{s['size']} {self.version}", f"{s['size']} {self.version}",
                       {f"extra/{s['key']}.txt": "x"}) for s in samples]

    def account(self, sample, result):
        self.accounted[sample["key"]] = result

    def rank_totals(self):
        return {"n": len(self.accounted)}

    def manifest(self):
        return {"version": self.version}


def _keys(root: Path) -> list[str]:
    return load_index(root, "train").keys


def test_writes_each_image_once_then_skips_what_is_current(synthetic_shards, tmp_path):
    out = tmp_path / "out"
    work = SizeWork(synthetic_shards, out)
    assert run_per_image(work, tmp_path / "run", "error") == 0
    keys = _keys(synthetic_shards)
    assert sorted(p.stem for p in out.glob("*.txt")) == sorted(keys)
    assert sorted(p.stem for p in (out / "extra").glob("*.txt")) == sorted(keys)
    assert set(work.accounted) == set(keys)
    manifest = json.loads((out / "manifest-rank000.json").read_text())
    assert manifest["written"] == 48 and manifest["already_done"] == 0 and manifest["version"] == "v1"
    assert manifest["max_pending_images"] <= 3 and sorted(manifest["ids"]) == sorted(keys)
    assert manifest["computes"] == len(work.groups) and manifest["images_per_compute"] == pytest.approx(48 / len(work.groups), abs=1e-3)
    phases = manifest["seconds_by_phase"]
    assert set(phases) == {"data", "compute", "waiting_for_writes"} and min(phases.values()) >= 0
    assert phases["data"] > 0 and sum(phases.values()) <= manifest["seconds"] + 0.01, manifest
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == sorted([f"{k}.txt" for k in keys] +
                                                                        ["manifest-rank000.json"])  # no temp files
    # every group had one size and at most batch_size images
    for group in work.groups:
        assert 1 <= len(group) <= 3
    again = SizeWork(synthetic_shards, out)
    assert run_per_image(again, tmp_path / "run", "error") == 0
    assert again.groups == [] and set(again.accounted) == set(keys)  # found current, still accounted
    (out / f"{keys[5]}.txt").write_text("garbage v0")
    newer = SizeWork(synthetic_shards, out)
    assert run_per_image(newer, tmp_path / "run", "error") == 0
    manifest = json.loads((out / "manifest-rank000.json").read_text())
    assert manifest["written"] == 1 and manifest["stale_replaced"] == 1 and manifest["ids"] == [keys[5]]


def test_bad_inputs_are_listed_together_and_nothing_is_reported(synthetic_shards, tmp_path):
    keys = _keys(synthetic_shards)
    work = SizeWork(synthetic_shards, tmp_path / "out", bad={keys[2], keys[30]})
    with pytest.raises(DataError) as e:
        run_per_image(work, tmp_path / "run", "error")
    assert "2 bad input(s) for split 'train'" in str(e.value)
    assert f"input of {keys[2]} is bad" in str(e.value) and f"input of {keys[30]} is bad" in str(e.value)
    assert not list((tmp_path / "out").glob("manifest-rank*.json"))


def test_an_empty_split_is_an_error(synthetic_shards, tmp_path):
    root = tmp_path / "empty"
    shutil.copytree(synthetic_shards, root)
    write_index(root, "train", [], has_masks=True)
    with pytest.raises(DataError, match=r"split 'train' has no images .*train\.json.*nothing for `vwe sizes`"):
        run_per_image(SizeWork(root, tmp_path / "out"), tmp_path / "run", "error")


def test_a_signal_stops_after_the_batch_in_progress(synthetic_shards, tmp_path):
    out = tmp_path / "out"
    work = SizeWork(synthetic_shards, out, batch_size=1, stop_after=5)
    assert run_per_image(work, tmp_path / "run", "error") == PREEMPT_EXIT_CODE
    assert len(list(out.glob("*.txt"))) == 5 and not list(out.glob("manifest-rank*.json"))
    assert signal.getsignal(signal.SIGUSR1) is not None  # handler restored
    rerun = SizeWork(synthetic_shards, out, batch_size=1)
    assert run_per_image(rerun, tmp_path / "run", "error") == 0
    manifest = json.loads((out / "manifest-rank000.json").read_text())
    assert manifest["already_done"] == 5 and manifest["written"] == 43


def test_group_batcher_never_holds_more_than_a_batch():
    batcher = GroupBatcher(2)
    ready = [g for i, k in enumerate("aabca") for g in batcher.add(k, {"i": i})]
    assert [[s["i"] for s in g] for g in ready] == [[0, 1], [2]]
    assert [[s["i"] for s in g] for g in batcher.drain()] == [[3], [4]] and batcher.max_pending == 2


def test_a_wider_window_fills_batches_and_still_bounds_what_waits():
    keys = "abcabcabcabc"
    narrow, wide = GroupBatcher(2), GroupBatcher(2, window=6)
    runs = {name: [g for i, k in enumerate(keys) for g in b.add(k, {"k": k, "i": i})] + list(b.drain())
            for name, b in (("narrow", narrow), ("wide", wide))}
    assert [len(g) for g in runs["narrow"]] == [1] * 12  # three sizes in turn: no pair ever meets
    assert [len(g) for g in runs["wide"]] == [2] * 6 and wide.max_pending <= 6
    for groups in runs.values():
        assert sorted(s["i"] for g in groups for s in g) == list(range(12))
        assert all(len({s["k"] for s in g}) == 1 for g in groups)


def test_vwe_infer_on_an_empty_split_exits_2(synthetic_shards, tmp_path):
    from conftest import TINY, run_vwe
    from helpers import export_random_weights
    root = tmp_path / "shards"
    shutil.copytree(synthetic_shards, root)
    write_index(root, "val", [], has_masks=True)
    overrides = [*TINY, f"data.root={root}", f"output.run_dir={tmp_path / 'run'}"]
    cfg = load_config(REPO / "configs" / "demo.yaml", overrides)
    export_random_weights(cfg, tmp_path / "run")
    proc = run_vwe("infer", "--config", str(REPO / "configs" / "demo.yaml"), *overrides, check=False)
    assert proc.returncode == 2 and "split 'val' has no images" in proc.stderr, proc.stderr
    assert not (tmp_path / "run" / "cams").exists() or not list((tmp_path / "run" / "cams").iterdir())


def test_write_queue_reports_in_order_bounds_what_waits_and_raises_a_failed_write(tmp_path):
    from vwe.runtime.errors import WriteError
    from vwe.runtime.files import WriteQueue
    done: list[int] = []
    writes = WriteQueue(threads=2, depth=3)
    try:
        for i in range(20):
            writes.submit([(tmp_path / f"{i}.bin", bytes([i]) * 100_000)], "test file", lambda i=i: done.append(i))
            assert len(writes._pending) <= 3
            assert done == list(range(len(done)))  # callbacks in submission order, each after its write
            assert all((tmp_path / f"{j}.bin").stat().st_size == 100_000 for j in done)
        writes.drain()
        assert done == list(range(20))
        (tmp_path / "taken").mkdir()
        (tmp_path / "taken" / "x.bin").mkdir()  # a folder where the file goes: the write fails
        writes.submit([(tmp_path / "taken" / "x.bin", b"x")], "test file", lambda: done.append(-1))
        with pytest.raises(WriteError, match="x.bin"):
            writes.drain()
        assert done[-1] == 19
    finally:
        writes.close()


def test_a_write_that_fails_fails_the_pass_naming_the_file(synthetic_shards, tmp_path):
    from vwe.runtime.errors import WriteError
    out = tmp_path / "out"
    key = _keys(synthetic_shards)[7]
    (out / "extra" / f"{key}.txt").mkdir(parents=True)  # a folder where one of its files goes
    with pytest.raises(WriteError, match=key):
        run_per_image(SizeWork(synthetic_shards, out), tmp_path / "run", "error")
    assert not list(out.glob("manifest-rank*.json"))
