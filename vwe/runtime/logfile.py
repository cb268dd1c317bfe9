"""`<run_dir>/<command>.log`: what rank 0 prints, line by line with timestamps, kept in the run directory.

The streams are teed, so the terminal (or the SLURM output file) sees exactly what it saw before.
Progress-bar redraws (carriage returns) keep only the final state of their line. Nothing is written until
the run directory exists (a command that fails its checks leaves no folder behind); the lines printed
before that are written then. Third-party start-up noise is silenced unless VWE_VERBOSE=1.
"""
from __future__ import annotations

import contextlib
import os
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO


def quiet_third_party() -> None:
    """Silence known start-up noise (DeepSpeed's 'Setting accelerator to CPU' on every CPU run)."""
    if os.environ.get("VWE_VERBOSE") == "1":
        return
    if "DS_ACCELERATOR" not in os.environ:
        import torch
        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"  # what DeepSpeed picks anyway, without the warning


class _Tee:
    """A text stream that writes through to `stream` and hands complete lines to `sink`."""

    def __init__(self, stream: TextIO, sink: "_LogFile") -> None:
        self.stream, self.sink, self.partial = stream, sink, ""

    def write(self, text: str) -> int:
        n = self.stream.write(text)
        for ch_line in text.splitlines(keepends=True):
            line = self.partial + ch_line
            if "\r" in line.rstrip("\r\n"):
                line = line.rstrip("\n").rsplit("\r", 1)[-1] + ("\n" if line.endswith("\n") else "")
            if line.endswith("\n"):
                self.sink.add(line.rstrip("\r\n"))
                self.partial = ""
            else:
                self.partial = line
        return n

    def flush(self) -> None:
        self.stream.flush()
        self.sink.flush()

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


_STAMPED = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ")


class _LogFile:
    def __init__(self, path: Path) -> None:
        self.path, self.pending, self.file = path, [], None

    def add(self, line: str) -> None:
        stamped = _STAMPED.match(line) is not None  # the training progress lines carry their own time
        self.pending.append(f"{line}\n" if stamped else f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")
        if self.file is not None or len(self.pending) % 20 == 0:
            self.flush()

    def flush(self) -> None:
        if self.file is None:
            if not self.path.parent.is_dir():
                return
            try:
                self.file = open(self.path, "a")
            except OSError:
                self.pending.clear()  # an unwritable run dir is reported by the command itself
                return
        self.file.writelines(self.pending)
        self.pending.clear()
        self.file.flush()

    def close(self) -> None:
        self.flush()
        if self.file is not None:
            self.file.close()


@contextlib.contextmanager
def run_log(run_dir: str | os.PathLike | None, command: str) -> Iterator[None]:
    """Tee stdout and stderr of rank 0 into `<run_dir>/<command>.log` for the duration of the block."""
    if run_dir is None or int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    sink = _LogFile(Path(run_dir) / f"{command}.log")
    out, err = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _Tee(out, sink), _Tee(err, sink)
    try:
        yield
    finally:
        for tee in (sys.stdout, sys.stderr):
            if isinstance(tee, _Tee) and tee.partial:
                sink.add(tee.partial)
                tee.partial = ""
        sys.stdout, sys.stderr = out, err
        sink.close()
