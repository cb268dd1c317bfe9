"""The training stream runs on through epoch ends with the same loader workers (no restart, no emptied
prefetch), and each epoch's batches are exactly those of a stream of that epoch alone, so a run and its
resumes, at an epoch end or inside an epoch, give what they gave when each epoch had its own loader."""
from __future__ import annotations

import itertools
import os
import shutil

import psutil
import pytest
import torch

from data_helpers import demo_cfg
from helpers import assert_bit_identical, final_weights, ok, run_train, summary
from vwe.data.loader import steps_per_epoch, train_batches


def _cfg(shards, *over):
    return demo_cfg(shards, "data.train_split=train", "data.worker_kind=process", *over)


def _epoch_by_epoch(cfg, rank: int, world: int, epoch: int, start: int, epochs: int) -> list[dict]:
    """The batches of `epochs` epochs from (epoch, start), each epoch from a loader of its own (as before
    one stream ran through epoch ends), made in this process."""
    alone = demo_cfg(cfg.data.root, "data.train_split=train", "data.num_workers=0",
                     f"train.batch_size={cfg.train.batch_size}", f"train.grad_accum={cfg.train.grad_accum}")
    return [b for e in range(epoch, epoch + epochs)
            for b in train_batches(alone.data, alone.train, rank, world, e, start if e == epoch else 0)]


def _same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(x["key"] == y["key"] and torch.equal(x["image"], y["image"])
                                    and torch.equal(x["labels"], y["labels"]) for x, y in zip(a, b))


def _children() -> set[int]:
    return {p.pid for p in psutil.Process(os.getpid()).children(recursive=True)}


def test_workers_are_not_restarted_at_an_epoch_end(synthetic_shards):
    cfg = _cfg(synthetic_shards, "train.batch_size=8", "train.grad_accum=2", "data.num_workers=2")
    per_epoch = steps_per_epoch(cfg.data, cfg.train) * cfg.train.grad_accum
    assert per_epoch == 12  # micro-batches of 2 samples per rank at world 2
    assert not _children()
    got, seen = [], []
    for batch in train_batches(cfg.data, cfg.train, 1, 2, 3, 7, epochs=3):  # epoch 3 from micro-batch 7
        got.append(batch)
        seen.append(_children())
    assert len(got) == (per_epoch - 7) + 2 * per_epoch
    # the two worker processes of the first batch made every batch: none started at the two epoch ends
    assert len(seen[0]) == 2 and set().union(*seen) == seen[0]
    assert not _children()  # and they ended with the stream
    assert _same(got, _epoch_by_epoch(cfg, 1, 2, 3, 7, 3))


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")
@pytest.mark.parametrize("kind, workers", [("process", 3), ("thread", 2), ("process", 0)])
def test_each_epoch_of_a_stream_is_that_epoch_alone(synthetic_shards, kind, workers):
    # 2 micro-batches per epoch: with 3 worker processes a worker has none in some epochs
    cfg = _cfg(synthetic_shards, "train.batch_size=24", f"data.num_workers={workers}", f"data.worker_kind={kind}")
    assert steps_per_epoch(cfg.data, cfg.train) == 2
    assert _same(list(train_batches(cfg.data, cfg.train, 0, 1, 0, 1, epochs=4)), _epoch_by_epoch(cfg, 0, 1, 0, 1, 4))
    # a stream that starts at an epoch's end (a resume there) starts with the next epoch
    assert _same(list(train_batches(cfg.data, cfg.train, 0, 1, 5, 2, epochs=2)), _epoch_by_epoch(cfg, 0, 1, 6, 0, 1))


def test_an_endless_stream_stops_its_workers_when_closed(synthetic_shards):
    cfg = _cfg(synthetic_shards, "train.batch_size=16", "data.num_workers=2")
    stream = train_batches(cfg.data, cfg.train, 0, 1, 5, epochs=None)
    got = list(itertools.islice(stream, 7))  # 3 per epoch: into the third
    assert len(_children()) == 2
    stream.close()
    assert not _children()
    assert _same(got, _epoch_by_epoch(cfg, 0, 1, 5, 0, 3)[:7])


def test_resume_inside_an_epoch_and_at_its_end_is_exact(synthetic_shards, tmp_path):
    """A run over three epochs of 3 steps (the val split) checkpoints every 2 steps; resumed from step 4
    (inside epoch 1, across the end at step 6) and from step 6 (that end), it ends bit-identical."""
    extra = ("data.train_split=val", "train.max_steps=8", "train.checkpoint_every=2", "train.keep_checkpoints=5",
             "train.deterministic=true")
    reference = tmp_path / "reference"
    ok(run_train(1, synthetic_shards, reference, *extra))
    assert summary(reference)["steps"] == 8
    for resume_at in (4, 6):
        run = tmp_path / f"from-{resume_at}"
        shutil.copytree(reference, run)
        shutil.rmtree(run / "final")
        for later in (run / "checkpoints").glob("step-*"):
            if int(later.name[5:]) > resume_at:
                shutil.rmtree(later)
        proc = ok(run_train(1, synthetic_shards, run, *extra))
        assert f"resumed from {run / 'checkpoints' / f'step-{resume_at:06d}'}" in proc.stdout + proc.stderr
        assert summary(run)["steps_this_run"] == 8 - resume_at
        assert_bit_identical(final_weights(reference), final_weights(run))
