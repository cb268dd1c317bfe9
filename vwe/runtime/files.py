"""Committing files to disk: atomic, durable writes and checksums.

Every output (shards, indexes, CAMs, labels, predictions, configs, weights, reports, benchmark results)
is written here (the per-image passes through WriteQueue, on background threads), to a temporary
name in its destination folder, flushed and fsync'ed, renamed over the final name, and the folder is
fsync'ed: a process kill or a node crash leaves either the old file or the new one, never a partial
file under the final name. The temporary is removed on any error. Temporary names start with a dot and
end in `.tmp<pid>`, so no reader globbing for `*.npz`, `*.tar` or `step-*` ever picks one up.
Not written here, by their nature: logs appended as a run goes (`<command>.log`, metrics.jsonl,
TensorBoard's event files), Accelerate's checkpoint files (written into a temporary folder that is
committed whole, `commit_dir`), and the benchmark's emulation of the published per-image `.npy` writes.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

from vwe.runtime.errors import VweError, WriteError


_CAUSES = {errno.ENOSPC: "no space left on the device", errno.EROFS: "read-only file system",
           errno.EACCES: "permission denied", errno.EDQUOT: "disk quota exceeded"}


def long_component(path: str | os.PathLike) -> str | None:
    """The first component of `path` longer than the file system allows (NAME_MAX, 255 on Linux), or None."""
    limit = 255
    with contextlib.suppress(OSError, ValueError, AttributeError):
        limit = os.pathconf(_existing_parent(Path(path)), "PC_NAME_MAX")
    return next((part for part in Path(path).parts if len(os.fsencode(part)) > limit), None)


def _existing_parent(path: Path) -> Path:
    for parent in [path, *path.parents]:
        with contextlib.suppress(OSError):
            if parent.is_dir():
                return parent
    return Path(".")


def os_cause(e: OSError, path: str | os.PathLike) -> str:
    """Why an OS call on `path` failed, in words (the too-long component named)."""
    if e.errno == errno.ENAMETOOLONG:
        part = long_component(path)
        if part is not None:
            return (f"the name {part[:40]!r}... is {len(os.fsencode(part))} bytes long, more than the file system "
                    f"allows for one path component (255)")
        return "the path is longer than the file system allows"
    return _CAUSES.get(e.errno, e.strerror or str(e))


def path_problem(path: str | os.PathLike, e: OSError) -> str:
    """`cannot use PATH: CAUSE`, for an OSError raised on `path`."""
    return f"cannot use {path}: {os_cause(e, path)}"


def mount_point(path: str | os.PathLike) -> Path:
    """The mount point of the file system holding `path` (or its nearest existing parent)."""
    p = _existing_parent(Path(path)).resolve()
    while not os.path.ismount(p) and p != p.parent:
        p = p.parent
    return p


def free_bytes(path: str | os.PathLike) -> int:
    """Bytes an unprivileged writer may still use on the file system holding `path`."""
    return shutil.disk_usage(_existing_parent(Path(path))).free


def no_space(e: BaseException) -> bool:
    """Whether an error (or one it wraps) is a full device or an exhausted quota. Serializers (torch.save,
    safetensors) raise their own types, naming the OS error only in the text, or not at all."""
    seen = 0
    while e is not None and seen < 10:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(os.strerror(code) in str(e) for code in (errno.ENOSPC, errno.EDQUOT)):
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def temp_name(path: Path) -> Path:
    """The temporary sibling that an atomic write of `path` goes through."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a folder's entries (a rename, a new file) durable."""
    with contextlib.suppress(OSError):  # some file systems refuse O_RDONLY on folders; nothing to do there
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def writing(path: str | os.PathLike, what: str = "output") -> Iterator[None]:
    """Turn OS errors while writing `path` into a WriteError naming the path and the cause."""
    try:
        yield
    except OSError as e:
        raise WriteError(f"cannot write {what} {path}: {os_cause(e, path)}") from e
    except Exception as e:
        # serializers (torch.save, safetensors) wrap the OS error in their own exception types
        found = [text for code, text in _CAUSES.items() if os.strerror(code) in str(e)]
        if isinstance(e, VweError) or not found:
            raise
        raise WriteError(f"cannot write {what} {path}: {found[0]}") from e


def atomic_write(path: str | os.PathLike, data: bytes | str | Callable[[BinaryIO], None],
                 what: str = "output") -> Path:
    """Write `data` (bytes, text, or a function writing into a binary file) to `path` atomically."""
    path = Path(path)
    tmp = temp_name(path)
    with writing(path, what):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(tmp, "wb") as f:
                if callable(data):
                    data(f)
                else:
                    f.write(data.encode() if isinstance(data, str) else data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(path.parent)
    return path


def fsync_tree(folder: Path) -> None:
    """fsync every file below `folder`, then the folders themselves."""
    for dirpath, _, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)


def commit_dir(tmp: Path, final: Path, what: str = "output") -> Path:
    """Make the folder `tmp` durable and rename it to `final` (replacing an older `final`)."""
    with writing(final, what):
        fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(final.parent)
    return final


class WriteQueue:
    """atomic_write on background threads, so that a pass computes its next batch while the last one is
    written (a VOC-sized CAM file takes ~8 ms to write and fsync: most of a GPU's time per image).

    At most `depth` writes wait; `submit` blocks beyond that. Each write's `then` callback runs on the
    calling thread, in submission order, once the write is on disk, so what the caller counts as written
    is on disk. A failed write raises its WriteError from the next `submit` or `drain`. `close` waits for
    the writes in flight (each is atomic either way) and stops the threads."""

    def __init__(self, threads: int = 2, depth: int = 8) -> None:
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="vwe-write")
        self._pending: deque = deque()
        self.depth = depth
        self.waited = 0.0  # seconds the caller spent blocked on writes (a pass bound by its disk shows it)

    def submit(self, files: list[tuple[Path, bytes | str | Callable[[BinaryIO], None]]], what: str,
               then: Callable[[], None]) -> None:
        """Write `files` ((path, data) pairs, each atomically, in order), then call `then`."""
        future = self._pool.submit(lambda: [atomic_write(path, data, what) for path, data in files])
        self._pending.append((future, then))
        while len(self._pending) > self.depth or (self._pending and self._pending[0][0].done()):
            self._finish()

    def drain(self) -> None:
        """Wait for every write submitted so far (and run their callbacks)."""
        while self._pending:
            self._finish()

    def _finish(self) -> None:
        future, then = self._pending.popleft()
        t0 = time.perf_counter()
        future.result()
        self.waited += time.perf_counter() - t0
        then()

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._pending.clear()
