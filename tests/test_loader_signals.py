"""DataLoader workers and the preemption signals: SLURM and slurm/launch.sh send SIGUSR1/SIGTERM to every
process of the job, the loader's worker processes included; a worker must not die from it (the main
process would fail with "DataLoader worker ... killed by signal" before it could checkpoint).
The end-to-end case (a preempted SLURM training job with data.num_workers=1 that checkpoints, is
requeued and resumes) is tests/test_slurm_pipeline.py::test_usr1_midway_checkpoints_requeues_and_resumes."""
from __future__ import annotations

import os
import signal

import psutil
import pytest
import torch

from data_helpers import demo_cfg
from vwe.data.loader import infer_samples, train_batches


def _workers() -> list[psutil.Process]:
    return psutil.Process(os.getpid()).children(recursive=True)


def _signal_workers_after(items, n: int):
    """Yield from `items`; after the n-th item send SIGUSR1 and SIGTERM to every loader worker."""
    signalled = []
    for i, item in enumerate(items, 1):
        yield item
        if i == n:
            signalled = _workers()
            assert signalled, "expected DataLoader worker processes"
            for p in signalled:
                p.send_signal(signal.SIGUSR1)
                p.send_signal(signal.SIGTERM)
    assert signalled, f"fewer than {n} items"


@pytest.mark.parametrize("num_workers", [1, 2])
def test_train_loader_workers_survive_preemption_signals(synthetic_shards, num_workers):
    # this process keeps the default dispositions (SIGUSR1 and SIGTERM terminate), as a rank
    # under a start method other than fork would give its workers
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL
    cfg = demo_cfg(synthetic_shards, "train.batch_size=4", "data.train_split=train",
                   f"data.num_workers={num_workers}", "data.worker_kind=process")
    reference = [b for epoch in (0, 1) for b in train_batches(cfg.data, cfg.train, 0, 1, epoch)]
    # signalled in the first epoch, the same workers go on into the second
    got = list(_signal_workers_after(train_batches(cfg.data, cfg.train, 0, 1, 0, epochs=2), num_workers))
    assert len(got) == len(reference) == 24
    assert all(a["key"] == b["key"] and torch.equal(a["image"], b["image"]) for a, b in zip(got, reference))


def test_infer_loader_workers_survive_preemption_signals(synthetic_shards):
    cfg = demo_cfg(synthetic_shards, "infer.num_workers=1", "infer.scales=[1.0]", "data.worker_kind=process")
    keys = [s["key"] for s in _signal_workers_after(infer_samples(cfg.data, cfg.infer, 0, 1, split="val"), 1)]
    reference = infer_samples(cfg.data, cfg.infer, 0, 1, split="val", with_scales=False)
    assert sorted(keys) == sorted(s["key"] for s in reference)
    assert len(keys) == 12
