"""Intra-op threads per compute call: every core for a lone call, the loaded count otherwise,
and never two calls with different counts running at once in one process."""

from __future__ import annotations

import random
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import pytest
import torch

from shared.compute_threads import WIDE_MARGIN, ComputeThreads


def _threads() -> int:
    return torch.get_num_threads()


def test_a_lone_call_gets_every_core_and_others_the_loaded_count() -> None:
    gate = ComputeThreads(alone=2, loaded=1)
    assert gate.run(True, _threads) == 2
    assert gate.run(False, _threads) == 1
    assert gate.calls == {2: 1, 1: 1}


def test_counts_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        ComputeThreads(alone=0, loaded=1)


def test_a_call_arriving_during_a_wide_call_waits_then_runs_narrow() -> None:
    gate = ComputeThreads(alone=2, loaded=1)
    started, release, second_started = threading.Event(), threading.Event(), threading.Event()

    def wide() -> int:
        started.set()
        release.wait(10)
        return _threads()

    def narrow() -> int:
        second_started.set()
        return _threads()

    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(gate.run, True, wide)
        assert started.wait(10)
        second = pool.submit(gate.run, True, narrow)  # lone, but the first is running
        assert gate.wait_until_waiting(1, timeout_s=10)
        assert not second_started.is_set()  # held while the wide call runs
        release.set()
        assert first.result(10) == 2
        assert second.result(10) == 1


def test_an_inline_call_is_refused_while_a_wide_call_runs() -> None:
    gate = ComputeThreads(alone=2, loaded=1)
    started, release = threading.Event(), threading.Event()

    def wide() -> int:
        started.set()
        release.wait(10)
        return _threads()

    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(gate.run, True, wide)
        assert started.wait(10)
        assert gate.try_run(_threads) == (False, None)
        release.set()
        assert first.result(10) == 2
    assert gate.try_run(_threads) == (True, 1)


def test_narrow_calls_overlap_each_other() -> None:
    gate = ComputeThreads(alone=2, loaded=1)
    both = threading.Barrier(2, timeout=10)  # passes only if both calls run at once

    def meet() -> int:
        both.wait()
        return _threads()

    with ThreadPoolExecutor(2) as pool:
        calls = [pool.submit(gate.run, False, meet) for _ in range(2)]
        assert [call.result(10) for call in calls] == [1, 1]


def test_no_two_torch_calls_with_different_counts_overlap() -> None:
    """A storm of real torch calls, lone or not at random, from four threads: every call
    records the count torch itself reports as it starts and ends; replaying that log, the calls
    running at any moment all report one count."""
    gate = ComputeThreads(alone=2, loaded=1)
    log: list[tuple[str, int, int]] = []  # (start/end, call id, torch's count)
    lock = threading.Lock()
    matrix = torch.randn(256, 256)
    ids = iter(range(1_000_000))

    def work(call: int) -> None:
        with lock:
            log.append(("start", call, _threads()))
        torch.mm(matrix, matrix).sum().item()
        with lock:
            log.append(("end", call, _threads()))

    def client(seed: int) -> None:
        chooser = random.Random(seed)
        for _ in range(150):
            with lock:
                call = next(ids)
            gate.run(chooser.random() < 0.5, partial(work, call))

    for _ in range(3):  # lone calls with nothing else running: wide
        with lock:
            call = next(ids)
        gate.run(True, partial(work, call))
    with ThreadPoolExecutor(4) as pool:
        for future in [pool.submit(client, seed) for seed in range(4)]:
            future.result(60)

    running: dict[int, int] = {}
    overlapped = 0
    for event, call, threads in log:
        if event == "start":
            assert all(other == threads for other in running.values()), (call, running)
            overlapped += bool(running)
            running[call] = threads
        else:
            assert running.pop(call) == threads  # the count did not change under the call
    assert not running
    assert overlapped > 0  # calls did run together, so the check above had something to check
    assert gate.calls[2] >= 3 and gate.calls[1] > 0  # both counts were exercised
    assert sum(gate.calls.values()) == 3 + 4 * 150


class Host:
    """A fake clock, and a call that costs the seconds its thread count costs on this host."""

    def __init__(self, cost: dict[int, float]) -> None:
        self.now = 0.0
        self.cost = cost

    def clock(self) -> float:
        return self.now

    def call(self) -> int:
        threads = _threads()
        self.now += self.cost[threads]
        return threads


def test_a_lone_kind_runs_with_its_faster_count_and_retries_the_slower_ever_less_often() -> None:
    host = Host({2: 5.0, 1: 1.0})  # a busy host: two threads spin-wait, five times slower
    gate = ComputeThreads(alone=2, loaded=1, clock=host.clock)
    chosen = [gate.run(True, host.call, key="m") for _ in range(2 + 130)]
    assert chosen[:2] == [2, 1]  # each count tried once
    retries = [n for n, threads in enumerate(chosen[2:], start=1) if threads == 2]
    # The 8th lone call retries two threads; it lost, five times slower: 40 calls (8 x 5) to
    # the next retry, then 80 (twice as long).
    assert retries == [8, 48, 128]
    assert gate.per_row_seconds("m") == {2: 5.0, 1: 1.0}
    assert gate.run(False, host.call, key="m") == 1  # under load: the loaded count, as always


def test_the_choice_follows_the_host() -> None:
    host = Host({2: 1.0, 1: 2.0})  # quiet: two threads are faster
    gate = ComputeThreads(alone=2, loaded=1, clock=host.clock)
    assert [gate.run(True, host.call, key="m") for _ in range(4)] == [2, 1, 2, 2]
    host.cost[2] = 5.0  # the host got busy
    # Each slow call moves the average (1.0 -> 2.2 -> 3.04); two threads are kept while they
    # are at most WIDE_MARGIN (1.25) x one thread's 2.0 per row, then dropped.
    assert [gate.run(True, host.call, key="m") for _ in range(3)] == [2, 2, 1]
    assert gate.run(True, host.call, key="other") == 2  # another kind learns on its own


def test_a_retry_replaces_an_average_learned_in_other_conditions() -> None:
    """Two threads four times slower (a busy host) are retried at the 8th lone call and then
    32 calls later; by then the host is quiet and that one retry's timing decides."""
    host = Host({2: 4.0, 1: 1.0})
    gate = ComputeThreads(alone=2, loaded=1, clock=host.clock)
    busy = [gate.run(True, host.call, key="m") for _ in range(2 + 20)]
    assert busy[2:].count(2) == 1  # the first retry, lost
    host.cost[2] = 0.5
    quiet = [gate.run(True, host.call, key="m") for _ in range(30)]
    assert quiet[-10:].count(2) >= 8  # wide again, the narrow count retried now and then


def test_a_wide_count_a_little_slower_is_kept() -> None:
    """Two threads 10 % slower per row than one (within WIDE_MARGIN): lone calls keep two, and
    one thread is retried now and then, as the slower count always is."""
    host = Host({2: 1.1, 1: 1.0})
    gate = ComputeThreads(alone=2, loaded=1, clock=host.clock)
    chosen = [gate.run(True, host.call, key="m") for _ in range(2 + 40)]
    assert chosen[:2] == [2, 1]
    assert chosen[2:].count(1) <= 5 and chosen[-1] == 2
    host.cost[2] = 1.0 * WIDE_MARGIN * 2  # now clearly slower: twice the margin
    later = [gate.run(True, host.call, key="m") for _ in range(6)]
    assert later[-1] == 1


def test_a_call_joined_by_another_is_not_a_lone_timing() -> None:
    host = Host({2: 1.0, 1: 1.0})
    gate = ComputeThreads(alone=2, loaded=1, clock=host.clock)
    assert gate.run(True, host.call, key="m") == 2  # two threads tried; one is next
    started, release = threading.Event(), threading.Event()

    def held() -> int:
        started.set()
        release.wait(10)
        return host.call()

    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(gate.run, True, held, key="m")
        assert started.wait(10)
        assert pool.submit(gate.run, False, host.call).result(10) == 1  # ran alongside
        release.set()
        assert first.result(10) == 1
    assert gate.per_row_seconds("m") == {2: 1.0}  # the shared call taught nothing
