"""Intra-op threads chosen per compute call: all of a tier's cores for a lone request, fewer
under load, and never two different counts at once in one process.

``torch.set_num_threads`` sets the calling thread's OpenMP and MKL counts (threads started
later inherit the last value set anywhere), so a call could in principle run with its own
count. Two calls with different counts running together would still oversubscribe the cores
(a wide call's OpenMP team spin-waits next to the other's), so ``ComputeThreads`` admits a
call only when nothing runs or everything running uses the same count. A wide call is chosen
only when nothing else runs; calls that arrive meanwhile wait for it and then run narrow.
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import torch

from shared.logs import get_logger

log = get_logger(__name__)
A = ParamSpec("A")
R = TypeVar("R")


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # no sched_getaffinity on this platform
        return max(1, os.cpu_count() or 1)


class ComputeThreads:
    """Admits compute calls by intra-op thread count: ``alone`` threads for a lone call,
    ``loaded`` otherwise; calls with different counts never overlap."""

    def __init__(self, alone: int, loaded: int) -> None:
        if alone < 1 or loaded < 1:
            raise ValueError("thread counts must be at least 1")
        self.alone = alone
        self.loaded = loaded
        self._changed = threading.Condition()
        self._running = 0
        self._in_use: int | None = None  # the count every running call uses
        self._waiting = 0
        self.calls: Counter[int] = Counter()  # calls started, by thread count

    def run(self, lone: bool, fn: Callable[A, R], *args: A.args, **kwargs: A.kwargs) -> R:
        """Run ``fn`` in this (worker) thread with the chosen count, waiting for running calls
        with another count to finish. ``lone``: the caller saw no other work in its tier."""
        with self._changed:
            threads = self._choose(lone)
            self._waiting += 1
            self._changed.notify_all()  # for wait_until_waiting
            self._changed.wait_for(lambda: self._admits(threads))
            self._waiting -= 1
            self._enter(threads)
        return self._call(threads, fn, *args, **kwargs)

    def try_run(
        self, fn: Callable[A, R], *args: A.args, **kwargs: A.kwargs
    ) -> tuple[bool, R | None]:
        """Run ``fn`` now with the loaded count if that needs no wait (for calls on an event
        loop); ``(False, None)`` when a call with another count is running."""
        with self._changed:
            if not self._admits(self.loaded):
                return False, None
            self._enter(self.loaded)
        return True, self._call(self.loaded, fn, *args, **kwargs)

    def waiting(self) -> int:
        """Calls waiting for their turn (for tests and metrics)."""
        with self._changed:
            return self._waiting

    def wait_until_waiting(self, calls: int, timeout_s: float | None = None) -> bool:
        """Block until ``calls`` calls wait for their turn (tests drive the gate in lockstep)."""
        with self._changed:
            return self._changed.wait_for(lambda: self._waiting >= calls, timeout_s)

    def _choose(self, lone: bool) -> int:
        return self.alone if lone and self._running == 0 and self._waiting == 0 else self.loaded

    def _admits(self, threads: int) -> bool:
        return self._running == 0 or self._in_use == threads

    def _enter(self, threads: int) -> None:
        self._running += 1
        self._in_use = threads
        self.calls[threads] += 1

    def _call(self, threads: int, fn: Callable[A, R], *args: A.args, **kwargs: A.kwargs) -> R:
        try:
            if torch.get_num_threads() != threads:  # this thread's own OpenMP/MKL count
                torch.set_num_threads(threads)
            return fn(*args, **kwargs)
        finally:
            with self._changed:
                self._running -= 1
                if self._running == 0:
                    self._in_use = None
                self._changed.notify_all()
