"""Where the monitor's throttle and block decisions outlive its statistics: the key store.

The statistics live in a ``MonitorStore`` (memory, or Redis without persistence); losing them
costs only the evidence gathered so far. A decision to throttle or block must not be lost with
them: it is written to the key store (``monitor_decisions`` in ``keys.sqlite3``) before the
state that carries it is committed, read on every admission, and lifted only by an operator's
clear.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Protocol

from public_api.keys import KeyStore
from public_api.monitor.store import Level, level_of


class DecisionStore(Protocol):
    """A key's lasting monitor decision ("throttled" or "blocked"), by key id.

    ``immediate``: ``decided`` answers without waiting for I/O (it never suspends).
    """

    immediate: bool

    async def decided(self, key_id: str) -> Level | None:
        """The key's decision, or None; ``Unavailable`` if it cannot be read."""

    async def decide(self, key_id: str, level: Level) -> None:
        """Raise the key's decision to ``level`` (a milder one changes nothing)."""

    async def lift(self, key_id: str) -> None:
        """Forget the key's decision (the operator's clear)."""


class KeyStoreDecisions:
    """``DecisionStore`` in the public tier's key store. Its writes run in a worker thread, and
    its reads too unless the store is a local file: a read is made on every admission and every
    monitor update, and a SQLite lookup costs less than a hand-off to a thread and back."""

    def __init__(self, keys: KeyStore, clock: Callable[[], float] = time.time) -> None:
        self._keys = keys
        self._clock = clock
        self.immediate = keys.local_lookups

    async def decided(self, key_id: str) -> Level | None:
        """The key's decision, or None."""
        if self.immediate:
            value = self._keys.monitor_decision(key_id)
        else:
            value = await asyncio.to_thread(self._keys.monitor_decision, key_id)
        return None if value is None else level_of(value)

    async def decide(self, key_id: str, level: Level) -> None:
        """Raise the key's decision to ``level``."""
        await asyncio.to_thread(self._keys.record_monitor_decision, key_id, level, self._clock())

    async def lift(self, key_id: str) -> None:
        """Forget the key's decision."""
        await asyncio.to_thread(self._keys.clear_monitor_decision, key_id)
