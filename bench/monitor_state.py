"""What keeping the monitor's state atomic and durable costs, per request and per update.

1. Admission: ``ExtractionMonitor.current`` (run on every request) with the state in memory or
   in Redis, with and without the lasting decisions in the SQLite key store.
2. Updates: two replicas (two monitors, each with its own Redis connections) observing one key
   at once, every request a batch of 4; how many compare-and-set attempts lost the race, and
   whether every sample was counted.

A throwaway ``redis-server`` is started on a Unix socket (as the tests do). Run from the
repository root:  .venv/bin/python bench/monitor_state.py --seconds 3
"""

# ruff: noqa: E402 - the repository root goes on sys.path before the project imports.
from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import argparse
import asyncio
import statistics
import tempfile
import time

import numpy as np
from structlog.testing import capture_logs

from public_api.keys import SqliteKeyStore
from public_api.monitor import (
    ExtractionMonitor,
    KeyStoreDecisions,
    MemoryMonitorStore,
    MonitorConfig,
    MonitorStore,
    RedisMonitorStore,
)
from public_api.monitor.state import key_state_from_bytes
from tests.support.redis_server import RedisServer

BATCH = 4


def _inputs(seed: int) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).normal(size=(BATCH, 4)).astype(np.float32)}


async def _admission(monitor: ExtractionMonitor, key_id: str, seconds: float) -> list[float]:
    await monitor.observe(key_id, "m", _inputs(0), {}, None, [])
    latencies: list[float] = []
    until = time.perf_counter() + seconds
    while (start := time.perf_counter()) < until:
        await monitor.current(key_id)
        latencies.append(time.perf_counter() - start)
    return latencies


async def _race(url: str, prefix: str, per_replica: int) -> tuple[int, int, float]:
    """(samples counted, conflicts, seconds) for two replicas sending ``per_replica`` each."""
    stores = [RedisMonitorStore(url, prefix=prefix) for _ in range(2)]
    replicas = [ExtractionMonitor(MonitorConfig(action="record"), {}, s) for s in stores]

    async def send(replica: ExtractionMonitor, offset: int) -> None:
        for i in range(per_replica):
            await replica.observe("k_race", "m", _inputs(offset + i), {}, None, [])

    started = time.perf_counter()
    with capture_logs() as logs:
        await asyncio.gather(send(replicas[0], 0), send(replicas[1], 10**6))
    seconds = time.perf_counter() - started
    data = await stores[0].get("k_race")
    for store in stores:
        await store.close()
    conflicts = sum(1 for event in logs if event["event"] == "monitor_update_conflict")
    counted = 0 if data is None else key_state_from_bytes(data).queries
    return counted, conflicts, seconds


def _row(name: str, latencies: list[float]) -> str:
    ordered = sorted(latencies)
    p99 = ordered[int(0.99 * (len(ordered) - 1))]
    return (
        f"{name:<34} {len(latencies) / sum(latencies):>9,.0f}/s  "
        f"median {statistics.median(latencies) * 1e6:>6.0f} us  p99 {p99 * 1e6:>6.0f} us"
    )


async def main(seconds: float, per_replica: int) -> None:
    with tempfile.TemporaryDirectory() as folder, RedisServer(Path(folder) / "redis") as redis:
        keys = SqliteKeyStore(Path(folder) / "keys.sqlite3")
        key, _ = keys.create("bench")
        decisions = KeyStoreDecisions(keys)
        redis_store = RedisMonitorStore(redis.url, prefix="bench:")
        cases: list[tuple[str, MonitorStore, KeyStoreDecisions | None]] = [
            ("memory state", MemoryMonitorStore(), None),
            ("memory state + key store decision", MemoryMonitorStore(), decisions),
            ("Redis state", redis_store, None),
            ("Redis state + key store decision", redis_store, decisions),
        ]
        print(f"monitor.current() for {seconds:g} s each (one caller):")
        for name, store, decided in cases:
            monitor = ExtractionMonitor(MonitorConfig(), {}, store, decisions=decided)
            print(_row(name, await _admission(monitor, key.key_id, seconds)))
        await redis_store.close()
        counted, conflicts, took = await _race(redis.url, "race:", per_replica)
        sent = 2 * per_replica * BATCH
        print(
            f"two replicas, {2 * per_replica} requests of {BATCH} on one key: {counted} of "
            f"{sent} samples counted, {conflicts} swaps lost the race and were redone, "
            f"{2 * per_replica / took:,.0f} updates/s"
        )
        keys.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--requests", type=int, default=500, help="per replica")
    args = parser.parse_args()
    asyncio.run(main(args.seconds, args.requests))
