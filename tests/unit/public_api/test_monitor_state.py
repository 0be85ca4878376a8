"""The monitor's state under several replicas: compare-and-set updates that lose nothing,
state that cannot be read refused, and throttle and block decisions kept in the key store.

Two ``ExtractionMonitor`` objects on one store are two replicas. The race is staged in
lockstep: a replica's store runs the other replica's whole update between its read and its
swap, so the swap meets a version it did not read.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import redis
from structlog.testing import capture_logs

from public_api.keys import SqliteKeyStore
from public_api.monitor import (
    Action,
    Assessment,
    ExtractionMonitor,
    KeyStoreDecisions,
    MemoryMonitorStore,
    MonitorConfig,
    MonitorStore,
    RedisMonitorStore,
)
from public_api.monitor.state import KeyState, key_state_from_bytes
from shared.errors import Unavailable
from tests.support.redis_server import RedisServer, redis_server_fixture

redis_server = redis_server_fixture(scope="module")

MODEL = "m"
# Every query scores at least 0: with these thresholds the first request blocks the key.
BLOCK_AT_ONCE = MonitorConfig(block_threshold=0.0, flag_threshold=0.0, min_queries=1)
Hook = Callable[[], Awaitable[object]]


class RacedMemoryStore(MemoryMonitorStore):
    """The memory store; before each of its first ``times`` swaps it runs ``hook`` (another
    replica's update), so those swaps meet a state written after they read it."""

    def __init__(self, hook: Hook | None = None, times: int = 1) -> None:
        super().__init__()
        self.hook, self.times = hook, times

    async def swap(self, key_id: str, expected: str | None, data: bytes) -> bool:
        if self.hook is not None and self.times > 0:
            self.times -= 1
            await self.hook()
        return await super().swap(key_id, expected, data)


class MemoryMonitorStoreView(MemoryMonitorStore):
    """Another replica's handle on the same memory (without its race hook)."""

    def __init__(self, shared: MemoryMonitorStore) -> None:
        super().__init__()
        self._data = shared._data


class RacedRedisStore(RedisMonitorStore):
    """The Redis store with the same hook before its first swap."""

    hook: Hook | None = None

    async def swap(self, key_id: str, expected: str | None, data: bytes) -> bool:
        hook, self.hook = self.hook, None
        if hook is not None:
            await hook()
        return await super().swap(key_id, expected, data)


def _replica(
    store: MonitorStore,
    config: MonitorConfig | None = None,
    decisions: KeyStoreDecisions | None = None,
) -> ExtractionMonitor:
    return ExtractionMonitor(config or MonitorConfig(), {}, store, decisions=decisions)


def _observe(monitor: ExtractionMonitor, key_id: str, samples: int) -> Awaitable[Assessment]:
    rng = np.random.default_rng(samples)
    inputs = {"x": rng.normal(size=(samples, 4)).astype(np.float32)}
    return monitor.observe(key_id, MODEL, inputs, {}, None, [])


async def _queries(store: MonitorStore, key_id: str) -> int:
    data = await store.get(key_id)
    assert data is not None
    return key_state_from_bytes(data).queries


@pytest.fixture
def prefix() -> str:
    return f"test:{uuid.uuid4().hex[:8]}:"


async def test_the_replica_that_loses_the_race_counts_again_from_the_fresh_state(
    redis_server: RedisServer, prefix: str
) -> None:
    store_a = RacedRedisStore(redis_server.url, prefix=prefix)
    store_b = RedisMonitorStore(redis_server.url, prefix=prefix)
    replica_a, replica_b = _replica(store_a), _replica(store_b)
    try:
        await _observe(replica_b, "k_race", 2)
        store_a.hook = lambda: _observe(replica_b, "k_race", 3)  # lands between A's read and swap
        with capture_logs() as logs:
            assessment = await _observe(replica_a, "k_race", 5)
        assert [e["event"] for e in logs].count("monitor_update_conflict") == 1
        assert assessment.queries == 2 + 3 + 5
        assert await _queries(store_b, "k_race") == 2 + 3 + 5  # nobody's update was lost
    finally:
        await store_a.close()
        await store_b.close()


async def test_a_replica_that_computed_ok_from_stale_state_never_unblocks(
    redis_server: RedisServer, prefix: str
) -> None:
    store_a = RacedRedisStore(redis_server.url, prefix=prefix)
    store_b = RedisMonitorStore(redis_server.url, prefix=prefix)
    replica_a, replica_b = _replica(store_a), _replica(store_b, BLOCK_AT_ONCE)
    try:
        await _observe(replica_a, "k_stale", 1)  # "ok" (the default thresholds need more)
        store_a.hook = lambda: _observe(replica_b, "k_stale", 1)  # B blocks meanwhile
        assessment = await _observe(replica_a, "k_stale", 1)  # computed "ok" first, then again
        assert assessment.level == "blocked"
        assert (await replica_b.current("k_stale")).level == "blocked"
        data = await store_b.get("k_stale")
        assert data is not None and key_state_from_bytes(data).level == "blocked"
        await replica_a.clear("k_stale")  # only an operator's clear lowers it
        assert (await replica_b.current("k_stale")).level == "ok"
    finally:
        await store_a.close()
        await store_b.close()


async def test_updates_give_up_after_bounded_attempts_and_count_nothing() -> None:
    other: list[ExtractionMonitor] = []
    store = RacedMemoryStore(lambda: _observe(other[0], "k_busy", 1), times=10**6)
    other.append(_replica(MemoryMonitorStoreView(store)))
    loser = _replica(store, MonitorConfig(cas_attempts=3))
    with capture_logs() as logs, pytest.raises(Unavailable, match="retry"):
        await _observe(loser, "k_busy", 7)
    events = [e["event"] for e in logs]
    assert events.count("monitor_update_conflict") == 3
    assert events.count("monitor_update_contended") == 1
    assert await _queries(store, "k_busy") == 3  # the other replica's three updates, not the 7


@pytest.mark.parametrize(
    "garbage",
    [
        pytest.param(("hset", b"not a monitor state"), id="garbled-data"),
        pytest.param(("set", b"\x00\x01"), id="garbled-string"),
        pytest.param(("rpush", b"\x00\x01"), id="wrong-type"),
        pytest.param(("hset", KeyState(level="bananas").to_bytes()), id="unknown-level"),
    ],
)
async def test_unreadable_state_is_refused_never_read_as_ok(
    redis_server: RedisServer, prefix: str, garbage: tuple[str, bytes]
) -> None:
    kind, data = garbage
    raw = redis.Redis.from_url(redis_server.url)
    if kind == "set":
        raw.set(prefix + "k_bad", data)
    elif kind == "rpush":
        raw.rpush(prefix + "k_bad", data)
    else:
        raw.hset(prefix + "k_bad", mapping={"v": "0", "d": data})
    store = RedisMonitorStore(redis_server.url, prefix=prefix)
    monitor = _replica(store)
    try:
        with capture_logs() as logs:
            with pytest.raises(Unavailable, match="cannot be read"):
                await monitor.current("k_bad")
            with pytest.raises(Unavailable, match="cannot be read"):
                await _observe(monitor, "k_bad", 1)
        assert [e["event"] for e in logs] == ["monitor_state_unreadable"] * 2
        left = {
            "set": lambda: raw.get(prefix + "k_bad"),
            "rpush": lambda: raw.lindex(prefix + "k_bad", 0),
            "hset": lambda: raw.hget(prefix + "k_bad", "d"),
        }[kind]()
        assert left == data  # left as found, for the operator to look at
        await monitor.clear("k_bad")  # the operator's way out
        assert (await monitor.current("k_bad")).level == "ok"
    finally:
        await store.close()
        raw.close()


async def test_a_state_written_before_versions_is_read_and_upgraded(
    redis_server: RedisServer, prefix: str
) -> None:
    """Earlier releases SET the state as a plain string: it still counts, and blocks."""
    with redis.Redis.from_url(redis_server.url) as raw:
        raw.set(prefix + "k_old", KeyState(level="blocked").to_bytes())
        store = RedisMonitorStore(redis_server.url, prefix=prefix)
        monitor = _replica(store)
        try:
            assert (await monitor.current("k_old")).level == "blocked"
            assert (await _observe(monitor, "k_old", 2)).level == "blocked"
            assert raw.type(prefix + "k_old") == b"hash"
            assert await _queries(store, "k_old") == 2
        finally:
            await store.close()


@pytest.fixture
def keys(tmp_path: Path) -> Iterator[SqliteKeyStore]:
    store = SqliteKeyStore(tmp_path / "keys.sqlite3")
    yield store
    store.close()


@pytest.mark.parametrize("action", ["throttle", "block"])
async def test_decisions_outlive_the_state(keys: SqliteKeyStore, action: Action) -> None:
    key, _ = keys.create("suspect")
    decisions = KeyStoreDecisions(keys)
    config = replace(BLOCK_AT_ONCE, action=action)
    level = "blocked" if action == "block" else "throttled"
    reached = await _observe(_replica(MemoryMonitorStore(), config, decisions), key.key_id, 1)
    assert reached.level == level
    assert keys.monitor_decision(key.key_id) == level

    restarted = MemoryMonitorStore()  # the state is gone (Redis restarted without persistence)
    replica = _replica(restarted, MonitorConfig(), decisions)  # default thresholds: "ok" alone
    assert (await replica.current(key.key_id)).level == level
    assert (await _observe(replica, key.key_id, 1)).level == level
    data = await restarted.get(key.key_id)
    assert data is not None and key_state_from_bytes(data).level == level  # written back

    await replica.clear(key.key_id)
    assert keys.monitor_decision(key.key_id) is None
    assert (await replica.current(key.key_id)).level == "ok"


async def test_a_block_kept_only_in_the_state_is_made_lasting_when_read(
    keys: SqliteKeyStore,
) -> None:
    """A state blocked before decisions were kept (an upgrade) gains its decision on admission."""
    key, _ = keys.create("blocked-before-upgrade")
    store = MemoryMonitorStore()
    await _observe(_replica(store, BLOCK_AT_ONCE), key.key_id, 1)  # no decision store
    assert keys.monitor_decision(key.key_id) is None
    replica = _replica(store, decisions=KeyStoreDecisions(keys))
    assert (await replica.current(key.key_id)).level == "blocked"
    assert keys.monitor_decision(key.key_id) == "blocked"


async def test_a_decision_written_through_another_connection_is_read_at_the_next_admission(
    tmp_path: Path,
) -> None:
    """With keys in a local SQLite file the decision is read on the event loop, without a
    hand-off to a thread; another replica or the CLI writes it through a connection of its
    own, and the next admission sees it (and its clear) at once."""
    path = tmp_path / "shared-keys.sqlite3"
    own, other = SqliteKeyStore(path), SqliteKeyStore(path)
    key, _ = own.create("watched")
    decisions = KeyStoreDecisions(own)
    assert decisions.immediate
    replica = _replica(MemoryMonitorStore(), decisions=decisions)
    assert (await replica.current(key.key_id)).level == "ok"
    other.record_monitor_decision(key.key_id, "blocked", time.time())
    assert (await replica.current(key.key_id)).level == "blocked"
    other.clear_monitor_decision(key.key_id)
    assert (await replica.current(key.key_id)).level == "ok"
    own.close()
    other.close()
