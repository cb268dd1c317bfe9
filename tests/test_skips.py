"""SkipPolicy: skip-or-raise, counts per reason with ids, rate-limited log lines, one read per output."""
from __future__ import annotations

import logging
import pickle

import pytest

from vwe.runtime.errors import DataError
from vwe.runtime.skips import Skip, SkipPolicy, unseen_after


def test_error_mode_raises_the_samples_message():
    policy = SkipPolicy("error")
    with pytest.raises(DataError, match="shard a.tar, sample 'x': cannot decode JPEG"):
        policy.skip("x", "shard a.tar, sample 'x': cannot decode JPEG")

    def bad():
        raise DataError("shard b.tar, sample 'y': truncated")
    with pytest.raises(DataError, match="sample 'y'"):
        policy.attempt("y", bad)
    assert policy.total == 0


def test_skip_mode_counts_by_reason_with_ids():
    policy = SkipPolicy("skip")

    def bad(key):
        raise DataError(f"sample {key!r}: broken")
    assert policy.attempt("b", bad, "b", reason="jpeg") is None
    assert policy.attempt("ok", lambda: 5) == 5
    policy.skip("a", "sample 'a': mask holds value(s) 30", reason="mask values")
    policy.skip("c", "sample 'c': broken", reason="jpeg")
    policy.skip("c", "sample 'c': broken", reason="jpeg")  # the same id again is not counted twice
    assert policy.total == 3 and policy.ids == ["a", "b", "c"]
    assert policy.by_reason() == {"jpeg": ["b", "c"], "mask values": ["a"]}
    r = policy.report()
    assert r["count"] == 3 and r["on_corrupt"] == "skip" and r["messages"]["b"] == "sample 'b': broken"
    assert policy.summary("on rank 0") == "3 corrupt sample(s) skipped on rank 0 (data.on_corrupt=skip): 2 jpeg, " \
                                          "1 mask values"
    assert SkipPolicy("skip").summary() == ""


def test_window_is_read_once_per_period():
    policy = SkipPolicy("skip")
    policy.skip("a", "m")
    policy.skip("b", "m")
    assert policy.take_window() == 2 and policy.take_window() == 0
    policy.skip("c", "m")
    assert policy.take_window() == 1 and policy.total == 3


def test_log_lines_are_rate_limited(caplog):
    now = [0.0]
    policy = SkipPolicy("skip", log_first=3, log_every_s=10.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="vwe.runtime.skips"):
        for i in range(50):  # 50 skips within one second
            now[0] = i / 50
            policy.skip(f"id{i:02d}", f"sample 'id{i:02d}': broken")
        assert len(caplog.records) == 3  # the first three, one line each; then silence within 10 s
        now[0] = 12.0
        policy.skip("late", "sample 'late': broken")
    assert len(caplog.records) == 4
    assert "skipped 48 more corrupt sample(s)" in caplog.records[-1].getMessage()
    assert "51 in all so far" in caplog.records[-1].getMessage()
    assert policy.total == 51


def test_worker_decides_main_records_and_ranks_merge():
    policy = SkipPolicy("skip")
    worker = pickle.loads(pickle.dumps(policy))  # what a loader worker process holds
    shipped = pickle.loads(pickle.dumps(worker.decide("k1", "sample 'k1': bad", "jpeg")))
    assert shipped == Skip("k1", "jpeg", "sample 'k1': bad") and worker.total == 0
    policy.record(shipped)
    other_rank = SkipPolicy("skip")
    other_rank.skip("k2", "sample 'k2': bad", "mask values")
    policy.merge([pickle.loads(pickle.dumps(other_rank.state()))])
    assert policy.by_reason() == {"jpeg": ["k1"], "mask values": ["k2"]}
    with pytest.raises(DataError, match="k3"):
        SkipPolicy("error").decide("k3", "sample 'k3': bad")


def test_unseen_after_names_what_the_loader_left_out():
    policy = SkipPolicy("skip")
    samples = [{"key": "a"}, {"key": "c", "skips": [Skip("b", "jpeg", "sample 'b': bad")]}]
    got = list(unseen_after(iter(samples), ["a", "b", "c", "d"], policy))
    assert [s["key"] for s in got] == ["a", "c"]
    assert policy.by_reason() == {"corrupt": ["d"], "jpeg": ["b"]}
    # stopped early (a preempted run): nothing is recorded for what was not reached
    early = SkipPolicy("skip")
    gen = unseen_after(iter([{"key": "a"}]), ["a", "b"], early)
    next(gen)
    gen.close()
    assert early.total == 0
    with pytest.raises(DataError, match="'b'"):
        list(unseen_after(iter([{"key": "a"}]), ["a", "b"], SkipPolicy("error")))
