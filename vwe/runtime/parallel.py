"""One way to run a function over a stream on threads: results in the stream's order, a bounded number in
flight. The loaders (JPEG decoding and torch's resizes release the GIL) and the evaluation (zlib and
NumPy's loops release it) use it; order-preserving, so nothing downstream depends on the thread count.
And how many cores this process may use, for whoever sizes a pool."""
from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS has one, e.g. under SLURM)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def ordered_map(fn: Callable[[T], R], items: Iterable[T], threads: int, name: str = "vwe") -> Iterator[R]:
    """fn(item) for each item on `threads` threads (in this thread when threads <= 1), results in item
    order, at most 2 x threads in flight. Closing the iterator early cancels what has not started."""
    if threads <= 1:
        yield from map(fn, items)
        return
    pending: deque[Future] = deque()
    with ThreadPoolExecutor(threads, thread_name_prefix=name) as pool:
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) >= 2 * threads:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()
