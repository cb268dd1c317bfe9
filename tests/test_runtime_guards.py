"""Fast unit tests of two runtime guarantees (docs/architecture.md), beside the subprocess runs that prove
them end to end (tests/test_checkpoint_runs.py, tests/test_train_safety.py): the run lock
(vwe/runtime/lock.py) against a real second process, a killed holder and a directory in its place; the
preemption flag (vwe/runtime/preempt.py) with real signals sent to this process."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import REPO
from vwe.runtime.errors import RunLocked, WriteError
from vwe.runtime.lock import LOCK_NAME, RunLock
from vwe.runtime.preempt import PREEMPT_SIGNALS, PreemptionFlag, catch_early

HOLD = textwrap.dedent("""
    import sys, time
    from vwe.runtime.lock import RunLock
    RunLock(sys.argv[1], "holder test").acquire()
    print("held", flush=True)
    time.sleep(120)
""")


def _holder(run: Path) -> subprocess.Popen:
    """Another process holding the lock of `run` (started, and holding, when this returns)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_process_is_refused_naming_the_holder_then_takes_over_after_it_is_killed(tmp_path):
    run = tmp_path / "run"
    holder = _holder(run)
    try:
        with pytest.raises(RunLocked) as refused:
            RunLock(run, "vwe infer").acquire()
        assert f"pid {holder.pid}" in str(refused.value) and "holder test" in str(refused.value)
        assert str(run / LOCK_NAME) in str(refused.value)
    finally:
        holder.kill()
        holder.wait()
    lock = RunLock(run, "vwe infer").acquire()  # the kernel dropped the dead holder's flock
    try:
        assert lock.note and f"pid {holder.pid}" in lock.note and "no longer running" in lock.note
        record = json.loads((run / LOCK_NAME).read_text())
        assert record["pid"] == os.getpid() and record["purpose"] == "vwe infer"
    finally:
        lock.release()
    assert (run / LOCK_NAME).read_text() == ""  # released cleanly: an empty file


def test_the_lock_is_reentrant_within_a_process_and_held_until_the_last_release(tmp_path):
    run = tmp_path / "run"
    outer = RunLock(run, "vwe pipeline").acquire()
    inner = RunLock(run, "vwe infer").acquire()  # a pipeline's stage inside the pipeline's lock
    inner.release()
    with pytest.raises(subprocess.CalledProcessError):  # still held: another process is refused
        subprocess.run([sys.executable, "-c", "import sys; from vwe.runtime.lock import RunLock; "
                        "RunLock(sys.argv[1], 'x').acquire()", str(run)], cwd=REPO, check=True,
                       capture_output=True, timeout=60)
    outer.release()
    again = RunLock(run, "vwe train").acquire()
    assert again.note is None  # a clean release leaves nothing to take over
    again.release()


def test_a_directory_where_the_lock_file_goes_is_a_clear_error(tmp_path):
    (tmp_path / "run" / LOCK_NAME).mkdir(parents=True)
    with pytest.raises(WriteError, match="it is a directory"):
        RunLock(tmp_path / "run", "vwe train").acquire()


def _signal_self(sig: signal.Signals) -> None:
    os.kill(os.getpid(), sig)
    time.sleep(0.05)  # Python runs the handler at the next bytecode boundary of the main thread


@pytest.mark.parametrize("sig", PREEMPT_SIGNALS)
def test_the_flag_records_the_first_signal_and_restores_the_previous_handlers(sig):
    before = {s: signal.getsignal(s) for s in PREEMPT_SIGNALS}
    flag = PreemptionFlag().install()
    try:
        assert not flag.requested
        _signal_self(sig)
        other = next(s for s in PREEMPT_SIGNALS if s != sig)
        _signal_self(other)  # a second signal neither kills the process nor replaces the first
        assert flag.requested and flag.signal == sig
    finally:
        flag.restore()
    assert {s: signal.getsignal(s) for s in PREEMPT_SIGNALS} == before


def test_a_signal_during_start_up_is_handed_to_the_commands_flag():
    before = {s: signal.getsignal(s) for s in PREEMPT_SIGNALS}
    early = catch_early()
    _signal_self(signal.SIGUSR1)  # while imports and checks run
    flag = PreemptionFlag().install()
    try:
        assert flag.signal == signal.SIGUSR1
    finally:
        flag.restore()
    # the command's flag restores what was there before the early one, not the early one itself
    assert {s: signal.getsignal(s) for s in PREEMPT_SIGNALS} == before
    assert early.requested
