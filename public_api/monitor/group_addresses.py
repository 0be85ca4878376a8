"""The client addresses each key was served from, the only evidence key groups record per request.

``note`` is a dictionary update in memory; the periodic group pass calls ``flush`` (Redis: one
pipeline for everything noted since the last pass, so that every public replica sees every
key's addresses) and ``recent``. Each key keeps its ``max_per_key`` most recent addresses: a
client rotating through its IPv6 /64 still shows that /64.
"""

from __future__ import annotations

from typing import Protocol

import redis.exceptions
from redis.asyncio import Redis
from redis.typing import EncodableT, FieldT

from public_api.redis_client import redis_client
from shared.errors import Unavailable

__all__ = ["AddressBook", "MemoryAddressBook", "RedisAddressBook"]

Seen = dict[str, dict[str, float]]  # key id -> address -> when last served from it
_REDIS_DOWN: tuple[type[BaseException], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    TimeoutError,
    OSError,
)


class AddressBook(Protocol):
    """Which addresses each key was served from, and when last."""

    def note(self, key_id: str, address: str, now: float) -> None:
        """Remember that ``key_id`` was served from ``address`` (in memory, no I/O)."""

    async def flush(self) -> None:
        """Write what was noted to shared storage, if any."""

    async def recent(self, since: float) -> Seen:
        """Every key served since ``since``, with its addresses seen since then."""

    async def lease(self, seconds: float) -> bool:
        """Whether this replica runs the group pass now (one replica per interval)."""

    async def close(self) -> None:
        """Release connections."""


def _fields(addresses: dict[str, float]) -> dict[FieldT, EncodableT]:
    return {address: when for address, when in addresses.items()}


def _remember(seen: Seen, key_id: str, address: str, now: float, limit: int) -> None:
    addresses = seen.setdefault(key_id, {})
    addresses[address] = max(now, addresses.get(address, now))
    if len(addresses) > limit:
        del addresses[min(addresses, key=addresses.__getitem__)]


class MemoryAddressBook:
    """In this process (the embedded default, one replica)."""

    def __init__(self, max_per_key: int = 32) -> None:
        self._seen: Seen = {}
        self._limit = max_per_key

    def note(self, key_id: str, address: str, now: float) -> None:
        """Remember that ``key_id`` was served from ``address``."""
        _remember(self._seen, key_id, address, now, self._limit)

    async def flush(self) -> None:
        """Nothing to write: the book is this process's memory."""

    async def recent(self, since: float) -> Seen:
        """Keys served since ``since``; older entries are forgotten."""
        for key_id in list(self._seen):
            fresh = {a: t for a, t in self._seen[key_id].items() if t >= since}
            if fresh:
                self._seen[key_id] = fresh
            else:
                del self._seen[key_id]
        return {key_id: dict(addresses) for key_id, addresses in self._seen.items()}

    async def lease(self, seconds: float) -> bool:
        """Always: one replica."""
        return True

    async def close(self) -> None:
        """Nothing to release."""


class RedisAddressBook:
    """In Redis beside the monitor state: a hash of address -> time per key, and a sorted set
    of keys by last activity. Unreachable Redis raises ``Unavailable`` (the pass is skipped and
    what was noted is kept for the next one)."""

    def __init__(
        self,
        url: str,
        prefix: str = "splitvault:grp:",
        *,
        max_per_key: int = 32,
        ttl_s: float = 7 * 86400.0,
    ) -> None:
        self._redis: Redis = redis_client(url)
        self._prefix, self._limit, self._ttl_s = prefix, max_per_key, max(1, int(ttl_s))
        self._pending: Seen = {}

    def note(self, key_id: str, address: str, now: float) -> None:
        """Remember that ``key_id`` was served from ``address`` until the next flush."""
        _remember(self._pending, key_id, address, now, self._limit)

    async def flush(self) -> None:
        """One pipeline with every address noted since the last flush."""
        pending, self._pending = self._pending, {}
        if not pending:
            return
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for key_id, addresses in pending.items():
                    pipe.hset(f"{self._prefix}addr:{key_id}", mapping=_fields(addresses))
                    pipe.expire(f"{self._prefix}addr:{key_id}", self._ttl_s)
                    pipe.zadd(f"{self._prefix}active", {key_id: max(addresses.values())}, gt=True)
                await pipe.execute()
        except _REDIS_DOWN as error:
            for key_id, addresses in pending.items():
                for address, when in addresses.items():
                    _remember(self._pending, key_id, address, when, self._limit)
            raise Unavailable("the key group store (Redis) is unreachable") from error

    async def recent(self, since: float) -> Seen:
        """Keys active since ``since`` and their addresses; older entries are deleted."""
        active = f"{self._prefix}active"
        try:
            await self._redis.zremrangebyscore(active, "-inf", f"({since}")
            found_keys = await self._redis.zrangebyscore(active, since, "+inf")
            keys = [k.decode() if isinstance(k, bytes) else str(k) for k in found_keys]
            async with self._redis.pipeline(transaction=False) as pipe:
                for key_id in keys:
                    pipe.hgetall(f"{self._prefix}addr:{key_id}")
                found = await pipe.execute()
        except _REDIS_DOWN as error:
            raise Unavailable("the key group store (Redis) is unreachable") from error
        seen: Seen = {}
        for key_id, raw in zip(keys, found, strict=True):
            for address, when in raw.items():
                if float(when) >= since:
                    _remember(seen, key_id, address.decode(), float(when), self._limit)
        await self._trim(seen, {key_id: len(raw) for key_id, raw in zip(keys, found, strict=True)})
        return seen

    async def _trim(self, kept: Seen, stored: dict[str, int]) -> None:
        """Delete the addresses ``recent`` did not keep, so no hash outgrows ``max_per_key``."""
        crowded = [key_id for key_id, n in stored.items() if n > len(kept.get(key_id, {}))]
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                for key_id in crowded:
                    pipe.delete(f"{self._prefix}addr:{key_id}")
                    if kept.get(key_id):
                        pipe.hset(f"{self._prefix}addr:{key_id}", mapping=_fields(kept[key_id]))
                        pipe.expire(f"{self._prefix}addr:{key_id}", self._ttl_s)
                await pipe.execute()
        except _REDIS_DOWN as error:
            raise Unavailable("the key group store (Redis) is unreachable") from error

    async def lease(self, seconds: float) -> bool:
        """Whether this replica took the pass lease (SET NX with an expiry)."""
        try:
            taken = await self._redis.set(
                f"{self._prefix}lease", b"1", nx=True, px=max(1, int(seconds * 1000))
            )
        except _REDIS_DOWN as error:
            raise Unavailable("the key group store (Redis) is unreachable") from error
        return bool(taken)

    async def close(self) -> None:
        """Close the connection pool."""
        await self._redis.aclose()
