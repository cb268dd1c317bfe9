"""One policy for corrupt samples (`data.on_corrupt`): stop, or skip, count and report.

A `SkipPolicy` decides skip-or-raise, keeps every skipped id with its reason, rate-limits its log lines,
and is read once for each output: `take_window()` for a periodic line (an epoch), `summary()` for the
final line, `report()` for report.json / the manifest.

Where the decision is made in another process (a loader worker), split the two halves: the worker calls
`decide(...)`, which raises or returns a picklable `Skip`, and ships the `Skip` with its batch; the main
process calls `record(skip)`. In one process, `attempt(key, fn, ...)` does both. Over ranks, gather
`state()` and fold it in with `merge()`.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from vwe.runtime.errors import DataError

T = TypeVar("T")
log = logging.getLogger("vwe.runtime.skips")


@dataclass(frozen=True)
class Skip:
    """One skipped sample: its id, a short reason (the count's category) and the full message."""
    key: str
    reason: str
    message: str


class SkipPolicy:
    """Skip-or-raise for corrupt samples, with per-reason counts and ids, and rate-limited logging.

    `on_corrupt` is "error" (raise DataError with the sample's message) or "skip". The first
    `log_first` skips are logged one line each; after that at most one line per `log_every_s`
    seconds, saying how many were skipped since the last line.
    """

    def __init__(self, on_corrupt: str, *, what: str = "sample", log_first: int = 10,
                 log_every_s: float = 30.0, clock: Callable[[], float] = time.monotonic,
                 logger: logging.Logger = log):
        if on_corrupt not in ("error", "skip"):
            raise ValueError(f"on_corrupt must be 'error' or 'skip', got {on_corrupt!r}")
        self.on_corrupt, self.what = on_corrupt, what
        self.log_first, self.log_every_s = log_first, log_every_s
        self._clock, self._log = clock, logger
        self._skips: dict[str, Skip] = {}  # by id, in the order they were skipped
        self._window = 0
        self._unlogged = 0
        self._last_log: float | None = None

    @property
    def skipping(self) -> bool:
        return self.on_corrupt == "skip"

    # -- deciding ----------------------------------------------------------------------------------
    def decide(self, key: str, message: str, reason: str = "corrupt") -> Skip:
        """A corrupt sample: raise DataError(message) under on_corrupt=error, else the Skip to record
        (pure: safe to call in a worker process; the caller ships the Skip to `record`)."""
        if not self.skipping:
            raise DataError(message)
        return Skip(key, reason, message)

    def record(self, skip: Skip) -> None:
        """Count one skip (an id already recorded is not counted twice) and log it, rate-limited."""
        if skip.key in self._skips:
            return
        self._skips[skip.key] = skip
        self._window += 1
        n = len(self._skips)
        if n <= self.log_first:
            self._log.warning("skipped corrupt %s %r (data.on_corrupt=skip): %s", self.what, skip.key, skip.message)
            self._last_log = self._clock()
            return
        self._unlogged += 1
        now = self._clock()
        if self._last_log is None or now - self._last_log >= self.log_every_s:
            self._log.warning("skipped %d more corrupt %s(s) (data.on_corrupt=skip; %d in all so far), "
                              "last %r: %s", self._unlogged, self.what, n, skip.key, skip.message)
            self._unlogged, self._last_log = 0, now

    def skip(self, key: str, message: str, reason: str = "corrupt") -> None:
        """decide + record in one process."""
        self.record(self.decide(key, message, reason))

    def attempt(self, key: str, fn: Callable[..., T], *args: Any, reason: str = "corrupt") -> T | None:
        """fn(*args); a DataError from it is raised (on_corrupt=error) or recorded and None returned."""
        try:
            return fn(*args)
        except DataError as e:
            self.skip(key, str(e), reason)
            return None

    # -- reading -----------------------------------------------------------------------------------
    @property
    def total(self) -> int:
        return len(self._skips)

    @property
    def ids(self) -> list[str]:
        return sorted(self._skips)

    def by_reason(self) -> dict[str, list[str]]:
        """{reason: sorted ids}."""
        out: dict[str, list[str]] = {}
        for s in self._skips.values():
            out.setdefault(s.reason, []).append(s.key)
        return {r: sorted(ids) for r, ids in sorted(out.items())}

    def take_window(self) -> int:
        """Skips since the previous call (for a periodic line such as the epoch's); resets the window."""
        n, self._window = self._window, 0
        return n

    def summary(self, scope: str = "") -> str:
        """One line for the end of a run; empty when nothing was skipped."""
        if not self._skips:
            return ""
        parts = ", ".join(f"{len(ids)} {reason}" for reason, ids in self.by_reason().items())
        where = f" {scope}" if scope else ""
        return f"{self.total} corrupt {self.what}(s) skipped{where} (data.on_corrupt=skip): {parts}"

    def report(self) -> dict:
        """For report.json and manifests: the setting, the count, ids per reason, each id's message."""
        return {"on_corrupt": self.on_corrupt, "count": self.total, "by_reason": self.by_reason(),
                "messages": {k: self._skips[k].message for k in self.ids}}

    # -- over processes ----------------------------------------------------------------------------
    def state(self) -> list[tuple[str, str, str]]:
        """Picklable skips, to gather from the other ranks."""
        return [(s.key, s.reason, s.message) for s in self._skips.values()]

    def merge(self, states: Iterable[list[tuple[str, str, str]]]) -> None:
        """Fold in the skips gathered from other ranks (already logged there: not logged again)."""
        for state in states:
            for key, reason, message in state:
                self._skips.setdefault(key, Skip(key, reason, message))


def unseen_after(samples: Iterable[dict], expected: Sequence[str], policy: SkipPolicy) -> Iterator[dict]:
    """Pass a loader's samples through; once they are exhausted, record every id of `expected` that never
    came as skipped by the loader. Samples carrying `skips` (a list of Skip) are recorded as they come.

    The loader decides skips in its workers and reports only a count; this names them from the index
    (order-free, so it holds for worker processes too). Nothing is recorded if the caller stops early.
    Under on_corrupt=error an id that never came is an error of its own (the loader should have raised).
    """
    seen: set[str] = set()
    for sample in samples:
        for s in sample.get("skips", ()):
            policy.record(s)
        seen.add(sample["key"])
        yield sample
    recorded = set(policy.ids)
    missing = [key for key in expected if key not in seen and key not in recorded]
    for key in missing:
        message = (f"sample {key!r}: skipped by the loader (data.on_corrupt=skip); its error is in the log above"
                   if policy.skipping else
                   f"sample {key!r} is listed in the split's index but the loader never delivered it "
                   f"({len(missing)} such id(s))")
        policy.record(policy.decide(key, message))
