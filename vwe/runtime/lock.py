"""One writer per run directory: an flock on `<run_dir>/.lock`, naming its holder.

`vwe train` (rank 0) and `vwe infer` take the lock before writing anything into a run directory. A second
process gets exit 2 naming the holder (host, pid, start time, command). flock is released by the kernel
when its holder dies, so a lock left by a killed process is taken over, with a note naming the process it
came from. Where the file system refuses flock (some shared file systems mounted without lock support), the
holder recorded in the file decides: a live process, or one on another host that cannot be checked, keeps
it; a dead process on this host loses it.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from vwe.runtime.errors import RunLocked, WriteError
from vwe.runtime.files import writing

LOCK_NAME = ".lock"


def _holder_text(h: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(h.get("started", 0)))
    return f"{h.get('purpose', '?')} pid {h.get('pid', '?')} on host {h.get('host', '?')}, started {started}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """Exclusive lock on a run directory; re-entrant within a process (train then infer in one pipeline)."""

    _held: dict[Path, tuple[int, int]] = {}  # run dir -> (fd, depth), per process

    def __init__(self, run_dir: str | os.PathLike, purpose: str) -> None:
        self.run_dir = Path(run_dir).resolve()
        self.path = self.run_dir / LOCK_NAME
        self.purpose = purpose
        self.note: str | None = None  # set when a stale lock was taken over

    def acquire(self) -> "RunLock":
        if self.run_dir in RunLock._held:
            fd, depth = RunLock._held[self.run_dir]
            RunLock._held[self.run_dir] = (fd, depth + 1)
            return self
        with writing(self.run_dir, "run directory"):
            self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.path.is_dir():
            raise WriteError(f"cannot write lock file {self.path}: it is a directory (remove it: vwe keeps "
                             f"its run lock in this file)")
        with writing(self.path, "lock file"):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        previous = self._read(fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise RunLocked(f"run directory {self.run_dir} is in use by {_holder_text(previous)} "
                                f"(lock file {self.path}); wait for it, or use another output.run_dir") from None
            self._check_recorded_holder(fd, previous)  # no flock on this file system
        if previous.get("pid") and previous.get("pid") != os.getpid():
            self.note = (f"note: took over the lock of {self.run_dir} left by {_holder_text(previous)}, "
                         f"which is no longer running")
        record = {"purpose": self.purpose, "pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.time(), "command": " ".join(sys.argv)}
        with writing(self.path, "lock file"):
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(record).encode(), 0)
            os.fsync(fd)
        RunLock._held[self.run_dir] = (fd, 1)
        return self

    def _check_recorded_holder(self, fd: int, previous: dict) -> None:
        pid, host = previous.get("pid"), previous.get("host")
        if not pid or pid == os.getpid():
            return
        if host != socket.gethostname() or _alive(int(pid)):
            os.close(fd)
            raise RunLocked(f"run directory {self.run_dir} is in use by {_holder_text(previous)} (lock file "
                            f"{self.path}; this file system has no flock, so a holder on another host cannot "
                            f"be checked: delete the file if that process is gone)")

    @staticmethod
    def _read(fd: int) -> dict:
        try:
            return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        except (ValueError, UnicodeDecodeError):
            return {}

    def release(self) -> None:
        if self.run_dir not in RunLock._held:
            return
        fd, depth = RunLock._held[self.run_dir]
        if depth > 1:
            RunLock._held[self.run_dir] = (fd, depth - 1)
            return
        del RunLock._held[self.run_dir]
        try:
            os.ftruncate(fd, 0)  # an empty lock file means "released cleanly"
        except OSError:
            pass
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
