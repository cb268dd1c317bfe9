"""Progress of a long per-image pass: a tqdm bar on a terminal, plain timestamped-friendly lines otherwise;
and the time a loop waits for its items.

Redirected output (SLURM logs, `vwe pipeline > log`) must not fill with carriage-return bar frames, so
when stderr is not a terminal a line is printed every `every_s` seconds and at the end.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TextIO, TypeVar

from tqdm import tqdm

T = TypeVar("T")


def timed_waits(items: Iterable[T], add: Callable[[float], None]) -> Iterator[T]:
    """`items`, calling add(seconds) with the time spent waiting for each (a loader's share of a loop)."""
    it = iter(items)
    while True:
        t0 = time.perf_counter()
        item = next(it, None)
        add(time.perf_counter() - t0)
        if item is None:
            return
        yield item


class Progress:
    """Counts items; shows a bar on a terminal, else one line per `every_s` seconds. Silent if not `enabled`."""

    def __init__(self, desc: str, total: int | None = None, unit: str = "img", enabled: bool = True,
                 every_s: float = 30.0, stream: TextIO | None = None) -> None:
        self.desc, self.total, self.unit, self.every_s = desc, total, unit, every_s
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.terminal = enabled and self.stream.isatty()
        self.count = 0
        self._start = self._last = time.monotonic()
        self._bar = tqdm(desc=desc, total=total, unit=unit, dynamic_ncols=True, file=self.stream) \
            if self.terminal else None

    def update(self, n: int = 1) -> None:
        self.count += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.enabled and time.monotonic() - self._last >= self.every_s:
            self._line()

    def _line(self) -> None:
        self._last = time.monotonic()
        elapsed = self._last - self._start
        of = f"/{self.total}" if self.total is not None else ""
        rate = self.count / elapsed if elapsed > 0 else 0.0
        print(f"{self.desc}: {self.count}{of} {self.unit} ({rate:.2f} {self.unit}/s, {elapsed:.0f} s)",
              file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.enabled and self.count:
            self._line()
        self.enabled = False
