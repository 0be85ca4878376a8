"""Where monitor state lives: in memory, in Redis beside the rate limits, and the SQLite log.

``MonitorStore`` holds each key's serialized state (bytes from ``KeyState.to_bytes``) under a
version, so that replicas update it by compare-and-set.
``SqliteAssessmentLog`` keeps each key's latest ``Assessment`` in a file another process can
read (``splitvault monitor show``), plus the operator's pending ``monitor clear`` requests.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import redis.exceptions
from redis.asyncio import Redis

from public_api.redis_client import redis_client
from shared.errors import Unavailable
from shared.logs import get_logger
from shared.state_files import private_file

log = get_logger(__name__)

Level = Literal["ok", "flagged", "throttled", "blocked"]
LEVELS: tuple[Level, ...] = ("ok", "flagged", "throttled", "blocked")


def level_of(value: str) -> Level:
    """``value`` as a ``Level``; ``ValueError`` for anything else (never read as "ok")."""
    for level in LEVELS:
        if level == value:
            return level
    raise ValueError(f"unknown monitor level {value!r}")


def higher(first: Level, second: Level | None) -> Level:
    """The graver of two levels (``None``: no decision)."""
    if second is None or LEVELS.index(first) >= LEVELS.index(second):
        return first
    return second


# Errors that mean "Redis cannot answer now".
_REDIS_DOWN: tuple[type[BaseException], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.ReadOnlyError,
    TimeoutError,
    OSError,
)


@dataclass(frozen=True)
class Assessment:
    """The monitor's verdict on one key."""

    key_id: str
    score: float
    level: Level
    reasons: tuple[str, ...]
    queries: int
    updated_at: float


class UnreadableState(ValueError):
    """A key's stored state exists but cannot be read (wrong type, missing field, garbage)."""


@dataclass(frozen=True)
class Versioned:
    """A key's serialized state and the version it was written as (an opaque token)."""

    data: bytes
    version: str


class MonitorStore(Protocol):
    """Serialized per-key state, by key id, updated by compare-and-set on its version.

    Every writer reads ``read``, computes, then ``swap``s against the version it read: a writer
    that lost the race gets ``False`` and starts again from the fresh state, so no replica ever
    overwrites another's update. ``reset`` is the operator's clear, the only blind write.
    """

    async def read(self, key_id: str) -> Versioned | None:
        """The key's state and version; None if it has none; ``UnreadableState`` if garbled."""

    async def get(self, key_id: str) -> bytes | None:
        """Only the key's state (``read`` without the version)."""

    async def swap(self, key_id: str, expected: str | None, data: bytes) -> bool:
        """Write ``data`` if the key's version is still ``expected`` (None: the key has no
        state); False, writing nothing, if another writer came first."""

    async def reset(self, key_id: str, data: bytes) -> None:
        """Replace the key's state whatever it holds (``splitvault monitor clear``)."""

    async def keys(self) -> list[str]:
        """Every key id that has state."""


def _new_version() -> str:
    # Random, not a counter: a version seen before a Redis restart is never reissued after it.
    return secrets.token_hex(8)


class MemoryMonitorStore:
    """State in this process's memory (the embedded default, one replica)."""

    def __init__(self) -> None:
        self._data: dict[str, Versioned] = {}

    async def read(self, key_id: str) -> Versioned | None:
        """The key's state and version, or None."""
        return self._data.get(key_id)

    async def get(self, key_id: str) -> bytes | None:
        """Only the key's state."""
        found = self._data.get(key_id)
        return None if found is None else found.data

    async def swap(self, key_id: str, expected: str | None, data: bytes) -> bool:
        """Write ``data`` if the version is still ``expected``."""
        current = self._data.get(key_id)
        if (None if current is None else current.version) != expected:
            return False
        self._data[key_id] = Versioned(data, _new_version())
        return True

    async def reset(self, key_id: str, data: bytes) -> None:
        """Replace the key's state."""
        self._data[key_id] = Versioned(data, _new_version())

    async def keys(self) -> list[str]:
        """Every key id that has state."""
        return sorted(self._data)


# KEYS[1]: the key's hash; ARGV: expected version ("" for none), new version, data. A plain
# string (a state written before versions, read as version "legacy:SHA1") is swapped like a
# hash; a key of any other type never matches, so the writer re-reads and finds it unreadable.
_LEGACY = "legacy:"
_SWAP = """
local kind = redis.call('TYPE', KEYS[1])['ok']
local current = ''
if kind == 'hash' then
    current = redis.call('HGET', KEYS[1], 'v') or ''
elseif kind == 'string' then
    current = 'legacy:' .. redis.sha1hex(redis.call('GET', KEYS[1]))
elseif kind ~= 'none' then
    return 0
end
if current ~= ARGV[1] then
    return 0
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'v', ARGV[2], 'd', ARGV[3])
return 1
"""


class RedisMonitorStore:
    """State in Redis, shared by the public replicas: one hash per key (``v``: version, ``d``:
    state), swapped by a Lua script, so a write lands only on the state it was computed from.
    Unreachable Redis raises ``Unavailable``."""

    def __init__(
        self,
        url: str,
        prefix: str = "splitvault:mon:",
        *,
        timeout_s: float = 0.5,
        max_connections: int = 64,
    ) -> None:
        self._redis: Redis = redis_client(url, timeout_s=timeout_s, max_connections=max_connections)
        self._prefix = prefix
        self._swap = self._redis.register_script(_SWAP)

    async def read(self, key_id: str) -> Versioned | None:
        """The key's state and version, or None; ``UnreadableState`` if neither such a hash
        nor a plain string (the unversioned state of earlier releases)."""
        with _reachable():
            try:
                version, data = await self._redis.hmget(self._prefix + key_id, ["v", "d"])
            except redis.exceptions.ResponseError:  # WRONGTYPE: not a hash
                return await self._read_legacy(key_id)
        if version is None and data is None:
            return None
        if version is None or data is None:
            raise UnreadableState("the state has no version or no data")
        return Versioned(_as_bytes(data), _as_bytes(version).decode("ascii", "replace"))

    async def _read_legacy(self, key_id: str) -> Versioned | None:
        try:
            data = await self._redis.get(self._prefix + key_id)
        except redis.exceptions.ResponseError as error:  # WRONGTYPE again: neither
            raise UnreadableState(str(error)) from error
        if data is None:
            return None
        data = _as_bytes(data)
        return Versioned(data, _LEGACY + hashlib.sha1(data, usedforsecurity=False).hexdigest())

    async def get(self, key_id: str) -> bytes | None:
        """Only the key's state."""
        found = await self.read(key_id)
        return None if found is None else found.data

    async def swap(self, key_id: str, expected: str | None, data: bytes) -> bool:
        """Write ``data`` if the version is still ``expected`` (one Lua script, atomic)."""
        arguments: list[str | bytes] = [expected or "", _new_version(), data]
        with _reachable():
            return bool(await self._swap(keys=[self._prefix + key_id], args=arguments))

    async def reset(self, key_id: str, data: bytes) -> None:
        """Replace the key's state, whatever the key holds (one transaction)."""
        name = self._prefix + key_id
        with _reachable():
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.delete(name)
                pipe.hset(name, mapping={"v": _new_version(), "d": data})
                await pipe.execute()

    async def keys(self) -> list[str]:
        """Every key id that has state."""
        with _reachable():
            found = [key async for key in self._redis.scan_iter(match=self._prefix + "*")]
        return sorted(_as_bytes(key).decode()[len(self._prefix) :] for key in found)

    async def close(self) -> None:
        """Close the connection pool."""
        await self._redis.aclose()


@contextmanager
def _reachable() -> Iterator[None]:
    """Turn "Redis cannot answer now" into ``Unavailable`` (503 + Retry-After)."""
    try:
        yield
    except _REDIS_DOWN as error:
        raise Unavailable("the monitor store (Redis) is unreachable", retry_after_s=1) from error


def _as_bytes(value: bytes | str) -> bytes:
    return value.encode() if isinstance(value, str) else value


_SCHEMA = """
CREATE TABLE IF NOT EXISTS assessments (
    key_id TEXT PRIMARY KEY, score REAL NOT NULL, level TEXT NOT NULL, reasons TEXT NOT NULL,
    queries INTEGER NOT NULL, updated_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS clear_requests (
    key_id TEXT PRIMARY KEY, requested_at REAL NOT NULL);
"""


@contextmanager
def _connect(path: Path) -> Iterator[sqlite3.Connection]:
    with closing(sqlite3.connect(path, timeout=5.0)) as connection, connection:
        connection.execute("PRAGMA synchronous=NORMAL")
        yield connection


class SqliteAssessmentLog:
    """Each key's latest assessment in ``path`` (a SQLite file; WAL, so readers never wait).

    The async methods run SQLite in a thread; the sync ones are for the CLI.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        private_file(self.path)  # 0600 before SQLite creates it 0644
        with _connect(self.path) as connection:
            connection.execute("PRAGMA journal_mode=WAL")
            connection.executescript(_SCHEMA)

    async def record(self, assessment: Assessment) -> None:
        """Store ``assessment`` as its key's latest. The log is the operators' view, not the
        monitor's state (that is in the store): a write that fails (disk full, lock held) is
        logged and left to the key's next due update, and never fails the request."""
        try:
            await asyncio.to_thread(self.write, assessment)
        except sqlite3.Error as error:
            log.error("monitor_log_write_failed", key_id=assessment.key_id, reason=str(error))

    def write(self, assessment: Assessment) -> None:
        """Store ``assessment`` as its key's latest (blocking)."""
        with _connect(self.path) as connection:
            connection.execute(
                "INSERT OR REPLACE INTO assessments VALUES (?, ?, ?, ?, ?, ?)",
                (
                    assessment.key_id,
                    assessment.score,
                    assessment.level,
                    json.dumps(list(assessment.reasons)),
                    assessment.queries,
                    assessment.updated_at,
                ),
            )

    def request_clear(self, key_id: str) -> None:
        """Ask the serving tier to clear ``key_id`` (it polls for requests every few seconds)."""
        with _connect(self.path) as connection:
            connection.execute(
                "INSERT OR REPLACE INTO clear_requests VALUES (?, ?)", (key_id, time.time())
            )

    async def take_clear_requests(self) -> list[str]:
        """Pending clear requests, removed from the file as they are returned (none while the
        file cannot be read or written: they wait for the next poll)."""
        try:
            return await asyncio.to_thread(self._take_clear_requests)
        except sqlite3.Error as error:
            log.error("monitor_log_read_failed", reason=str(error))
            return []

    def _take_clear_requests(self) -> list[str]:
        with _connect(self.path) as connection:
            rows = connection.execute("SELECT key_id FROM clear_requests").fetchall()
            connection.executemany("DELETE FROM clear_requests WHERE key_id = ?", rows)
        return [str(row[0]) for row in rows]


def read_assessments(path: Path, key_id: str | None = None) -> list[Assessment]:
    """The latest assessment of every key (or of ``key_id``) in a log file, highest score first."""
    if not Path(path).is_file():
        return []
    query = "SELECT key_id, score, level, reasons, queries, updated_at FROM assessments"
    arguments: tuple[str, ...] = ()
    if key_id is not None:
        query, arguments = query + " WHERE key_id = ?", (key_id,)
    with _connect(Path(path)) as connection:
        rows = connection.execute(query + " ORDER BY score DESC, key_id", arguments).fetchall()
    return [
        Assessment(
            str(key), float(score), level_of(level), tuple(json.loads(reasons)), int(n), float(at)
        )
        for key, score, level, reasons, n, at in rows
    ]
