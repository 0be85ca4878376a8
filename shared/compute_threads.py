"""Intra-op threads chosen per compute call: all of a tier's cores for a lone request, fewer
under load, and never two different counts at once in one process.

``torch.set_num_threads`` sets the calling thread's OpenMP and MKL counts (threads started
later inherit the last value set anywhere), so a call could in principle run with its own
count. Two calls with different counts running together would still oversubscribe the cores
(a wide call's OpenMP team spin-waits next to the other's), so ``ComputeThreads`` admits a
call only when nothing runs or everything running uses the same count. A wide call is chosen
only when nothing else runs; calls that arrive meanwhile wait for it and then run narrow.

More threads are not always faster: on a host whose cores other processes also use, OpenMP
threads spin-wait for a descheduled team mate, and a MiniLM request on two threads was
measured 3-15 times slower than on one. So a lone call of a known kind (``key``, the model)
runs with whichever count has been faster for that kind, alone, per row (an exponential
average of both); the slower count is tried again now and then, less often each time it
loses and the less often the slower it was, so that the choice follows the host.

The wide count wins unless it is more than ``WIDE_MARGIN`` slower. A tier's wide call is timed
while the other tier runs its own count, and the two are coupled: on a quiet 2-core host a
MiniLM front on two threads took 12.2 ms while the private tier ran its back stage on one (the
front on one thread: 11.3 ms), and 8.6 ms once both tiers ran two (a lone request 32.7 ms
against 41.8 ms with both on one; BENCHMARKS.md). Judged strictly, each tier kept the other on
one thread; a small loss of the wide count is within that coupling, a busy host's is not.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from shared import phases
from shared.logs import get_logger

log = get_logger(__name__)
R = TypeVar("R")
SMOOTHING = 0.3  # weight of the newest lone call in a count's average seconds per row
RETRY_FIRST, RETRY_MOST = 8, 1024  # lone calls between tries of the slower count
WIDE_MARGIN = 1.25  # the wide count is kept while its seconds per row are at most this x narrow


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # no sched_getaffinity on this platform
        return max(1, os.cpu_count() or 1)


class ComputeThreads:
    """Admits compute calls by intra-op thread count: ``alone`` threads for a lone call,
    ``loaded`` otherwise; calls with different counts never overlap."""

    def __init__(
        self, alone: int, loaded: int, clock: Callable[[], float] = time.perf_counter
    ) -> None:
        if alone < 1 or loaded < 1:
            raise ValueError("thread counts must be at least 1")
        self._clock = clock
        self.alone = alone
        self.loaded = loaded
        self._changed = threading.Condition()
        self._running = 0
        self._in_use: int | None = None  # the count every running call uses
        self._waiting = 0
        self._entered = 0  # calls ever admitted: a lone call saw none join it if unchanged
        self.calls: Counter[int] = Counter()  # calls started, by thread count
        self._per_row: dict[tuple[str, int], float] = {}  # (key, threads) -> seconds per row
        self._lone_calls: Counter[str] = Counter()
        self._retry_every: dict[str, int] = {}
        self._last_threads: dict[str, int] = {}  # the count of each key's last lone timing

    def run(self, lone: bool, fn: Callable[[], R], *, key: str | None = None, rows: int = 1) -> R:
        """Run ``fn`` in this (worker) thread with the chosen count, waiting for running calls
        with another count to finish. ``lone``: the caller saw no other work in its tier;
        ``key`` and ``rows``: what the call computes, to learn which count is faster for it."""
        phases.mark("worker_started")
        with self._changed:
            alone = lone and self._running == 0 and self._waiting == 0 and self.alone != self.loaded
            threads = self._choose(key) if alone else self.loaded
            self._waiting += 1
            self._changed.notify_all()  # for wait_until_waiting
            self._changed.wait_for(lambda: self._admits(threads))
            self._waiting -= 1
            self._enter(threads)
            entered = self._entered
        if not alone or key is None:
            return self._call(threads, fn)
        started = self._clock()
        result = self._call(threads, fn)
        self._learn(key, threads, (self._clock() - started) / max(rows, 1), entered)
        return result

    def per_row_seconds(self, key: str) -> dict[int, float]:
        """The average seconds per row of lone ``key`` calls, by thread count."""
        with self._changed:
            return {t: v for (k, t), v in self._per_row.items() if k == key}

    def try_run(self, fn: Callable[[], R]) -> tuple[bool, R | None]:
        """Run ``fn`` now with the loaded count if that needs no wait (for calls on an event
        loop); ``(False, None)`` when a call with another count is running."""
        with self._changed:
            if not self._admits(self.loaded):
                return False, None
            self._enter(self.loaded)
        return True, self._call(self.loaded, fn)

    def calls_by_threads(self) -> dict[int, int]:
        """Calls started so far, by intra-op thread count."""
        with self._changed:
            return dict(self.calls)

    def waiting(self) -> int:
        """Calls waiting for their turn (for tests and metrics)."""
        with self._changed:
            return self._waiting

    def wait_until_waiting(self, calls: int, timeout_s: float | None = None) -> bool:
        """Block until ``calls`` calls wait for their turn (tests drive the gate in lockstep)."""
        with self._changed:
            return self._changed.wait_for(lambda: self._waiting >= calls, timeout_s)

    def _choose(self, key: str | None) -> int:
        """The count for a lone call: untried counts first, then the faster, with retries."""
        if key is None:
            return self.alone
        wide, narrow = self._per_row.get((key, self.alone)), self._per_row.get((key, self.loaded))
        if wide is None or narrow is None:
            return self.alone if wide is None else self.loaded
        faster = self._faster({self.alone: wide, self.loaded: narrow})
        slower = self.loaded if faster == self.alone else self.alone
        self._lone_calls[key] += 1
        if self._lone_calls[key] >= self._retry_every.setdefault(key, RETRY_FIRST):
            self._lone_calls[key] = 0
            return slower
        return faster

    def _learn(self, key: str, threads: int, per_row: float, entered: int) -> None:
        with self._changed:
            if self._entered != entered:  # another call ran alongside: not a lone timing
                return
            other = self.loaded if threads == self.alone else self.alone
            before = self._per_row.get((key, threads))
            # A count's average smooths its consecutive calls; a retry or a switch starts it
            # afresh, as its last calls ran in other conditions (a tier's lone calls while the
            # other tier was busy taught it that two threads are slow, then stuck for minutes).
            if before is None or self._last_threads.get(key) != threads:
                now = per_row
            else:
                now = before + SMOOTHING * (per_row - before)
            self._last_threads[key] = threads
            self._per_row[(key, threads)] = now
            rival = self._per_row.get((key, other))
            if rival is None or before is None:
                return
            was_faster = self._faster({threads: before, other: rival}) == threads
            is_faster = self._faster({threads: now, other: rival}) == threads
            if not was_faster and not is_faster:  # a retry of the slower count lost again
                # Wait twice as long, and at least as many calls as it is times slower (x8),
                # so that retries cost a bounded share of the time however slow they are.
                every = max(self._retry_every.get(key, RETRY_FIRST) * 2, RETRY_FIRST * now / rival)
                self._retry_every[key] = min(RETRY_MOST, math.ceil(every))
            elif was_faster != is_faster:
                self._retry_every[key] = RETRY_FIRST
                log.info(
                    "compute_threads_switched", key=key, threads=threads if is_faster else other
                )

    def _faster(self, per_row: dict[int, float]) -> int:
        """The count a lone call gets, given both counts' seconds per row: the wide one unless
        it is more than ``WIDE_MARGIN`` slower."""
        wide, narrow = per_row[self.alone], per_row[self.loaded]
        return self.alone if wide <= narrow * WIDE_MARGIN else self.loaded

    def _admits(self, threads: int) -> bool:
        return self._running == 0 or self._in_use == threads

    def _enter(self, threads: int) -> None:
        self._entered += 1
        self._running += 1
        self._in_use = threads
        self.calls[threads] += 1

    def _call(self, threads: int, fn: Callable[[], R]) -> R:
        try:
            if torch.get_num_threads() != threads:  # this thread's own OpenMP/MKL count
                torch.set_num_threads(threads)
            phases.mark(f"compute_start_{threads}t")
            result = fn()
            phases.mark("compute_done")
            return result
        finally:
            with self._changed:
                self._running -= 1
                if self._running == 0:
                    self._in_use = None
                self._changed.notify_all()


class ComputeCallsCollector(Collector):
    """``splitvault_compute_calls_total{threads}``: a tier's compute calls by thread count."""

    def __init__(self, threads: ComputeThreads) -> None:
        self._threads = threads

    def collect(self) -> Iterator[CounterMetricFamily]:
        """One sample per thread count used so far."""
        family = CounterMetricFamily(
            "splitvault_compute_calls",
            "Front- or back-stage compute calls, by the intra-op threads they ran with.",
            labels=["threads"],
        )
        for threads, count in sorted(self._threads.calls_by_threads().items()):
            family.add_metric([str(threads)], count)
        yield family
