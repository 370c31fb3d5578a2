"""CPU scoring as one call per core: several batches side by side, each on one torch thread.

On a CPU, one forward pass on N threads ties the cores together at every OpenMP barrier, and the
single-threaded steps between operators (decode, face crops, Python) leave the other cores idle.
N calls on one thread each have no barrier between them, and one call's single-threaded steps
overlap another's model work: on 2 cores, dn-piqa prepared + scored ran 0.077 images/s this way
against 0.066-0.073 for one 2-thread call. The Ray score actors and the in-process ``Scorer`` both
run CPU batches like this.
"""

from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")

_local = threading.local()
# Overlapping ordered_maps (several threads scoring at once): the first takes the count new threads start
# with, the last puts it back; each putting back what it saw would leave a later one's 1 behind.
_lock = threading.Lock()
_active = 0
_default = 0


def use_torch_threads(n: int) -> None:
    """Sets this thread's torch (OpenMP, MKL) thread count, once per thread.

    Those counts are per thread, but torch also keeps the count set last, on any thread, as the one
    new threads start with: ``ordered_map`` puts the caller's back when its calls are done.
    """
    if getattr(_local, "threads", None) != n:
        torch.set_num_threads(n)
        _local.threads = n


def ordered_map(fn: Callable[[T], R], items: Iterable[T], calls: int) -> Iterator[R]:
    """``fn`` over ``items`` on ``calls`` threads of one torch thread each, in input order.

    At most ``calls`` items are taken from ``items`` ahead of the results, so a lazy iterable (files
    read as they are needed) stays lazy. ``calls <= 1`` runs on the caller's thread, threads unchanged.
    """
    if calls <= 1:
        yield from map(fn, items)
        return

    def run(item: T) -> R:
        use_torch_threads(1)
        return fn(item)

    global _active, _default
    with _lock:
        if not _active:
            _default = torch.get_num_threads()
        _active += 1
    try:
        with ThreadPoolExecutor(calls, thread_name_prefix="piqa-call") as pool:
            pending: deque[Future[R]] = deque()
            for item in items:
                pending.append(pool.submit(run, item))
                if len(pending) >= calls:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
    finally:  # else every thread started later in the process would run torch on one thread
        with _lock:
            _active -= 1
            if not _active:
                torch.set_num_threads(_default)
