"""The gate's memory of recent callers: who a token belongs to and which terms it accepted.

Looking both up in the key store on every request costs two thread hops and two database
reads; for a tiny model that is most of the request. An entry lives ``ttl_s`` seconds, so a
key revoked or terms accepted through another process (``splitvault keys revoke``, another
replica) take effect within that time; acceptances through this tier update the entry at once.
Only successful authentications are cached: a bad token always reaches the store.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from public_api.keys import ApiKey


@dataclass(frozen=True)
class KnownCaller:
    """A token's key and the terms version that key accepted most recently (``None``: none)."""

    key: ApiKey
    accepted_version: str | None


class KeyCache:
    """Bounded, expiring map from a token's SHA-256 to the ``KnownCaller`` behind it."""

    def __init__(
        self,
        ttl_s: float = 5.0,
        max_entries: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ttl_s = ttl_s
        self._max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[str, tuple[KnownCaller, float]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, token_sha256: str) -> KnownCaller | None:
        """The cached caller for this token digest, unless missing or expired."""
        with self._lock:
            entry = self._entries.get(token_sha256)
            if entry is None:
                return None
            if entry[1] <= self._clock():
                del self._entries[token_sha256]
                return None
            self._entries.move_to_end(token_sha256)
            return entry[0]

    def put(self, token_sha256: str, caller: KnownCaller) -> None:
        """Remember ``caller`` for ``ttl_s`` seconds, dropping the least recently used entry."""
        if self._ttl_s <= 0:
            return
        with self._lock:
            self._entries[token_sha256] = (caller, self._clock() + self._ttl_s)
            self._entries.move_to_end(token_sha256)
            while len(self._entries) > self._max_entries:
                self._entries.popitem(last=False)

    def forget(self, key_id: str) -> None:
        """Drop every entry of ``key_id`` (after its terms acceptance changed here)."""
        with self._lock:
            stale = [d for d, (caller, _) in self._entries.items() if caller.key.key_id == key_id]
            for digest in stale:
                del self._entries[digest]

    def clear(self) -> None:
        """Forget everything."""
        with self._lock:
            self._entries.clear()
