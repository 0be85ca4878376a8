"""Signer registrations and answered nonces in the private tier's own Redis, for every replica.

The same ``SignerRegistry`` and ``NonceStore`` as ``private_core.signers``, shared: a signed
request answered by one private replica is refused by all the others (``SET NX`` on its key id
and nonce, kept ``2 * window + NONCE_MARGIN_S``: longer than its time is accepted anywhere),
and a registration made once is seen by all of them. A store that cannot answer refuses the
request (``Unavailable``, fail closed): an unchecked nonce could be a replay.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from typing import TypeVar

import redis
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from private_core.private_redis import STORE_FAILURES, StoreHealth
from shared.signatures import load_public_key, public_key_text

# Replicas' clocks may differ: a nonce outlives its window on every one of them by this much.
NONCE_MARGIN_S = 60
T = TypeVar("T")


class RedisSignatureState:
    """``SignerRegistry`` and ``NonceStore`` in the private store (blocking; called in threads)."""

    local_lookups = False

    def __init__(
        self, client: redis.Redis, *, prefix: str, window_s: float, health: StoreHealth
    ) -> None:
        self._client = client
        self._signers = f"{prefix}signers"
        self._nonces = f"{prefix}nonce:"
        self._ttl_s = math.ceil(2 * window_s) + NONCE_MARGIN_S
        self._health = health

    def public_key(self, key_id: str) -> Ed25519PublicKey | None:
        text = self._call(lambda: self._client.hget(self._signers, key_id))
        return None if text is None else load_public_key(_text(text))

    def register(self, key_id: str, public_key: Ed25519PublicKey) -> None:
        self._call(lambda: self._client.hset(self._signers, key_id, public_key_text(public_key)))

    def remove(self, key_id: str) -> bool:
        return bool(self._call(lambda: self._client.hdel(self._signers, key_id)))

    def signers(self) -> dict[str, str]:
        found = self._call(lambda: self._client.hgetall(self._signers))
        return {_text(k): _text(v) for k, v in sorted(found.items())}

    def use(self, key_id: str, nonce: str, created: int, *, forget_before: float) -> bool:
        """``SET NX`` with expiry; ``forget_before`` is the expiry's business here."""
        digest = hashlib.sha256(f"{key_id}\0{nonce}".encode()).hexdigest()
        key = f"{self._nonces}{digest}"
        return bool(self._call(lambda: self._client.set(key, created, nx=True, ex=self._ttl_s)))

    def close(self) -> None:
        """Close the store's connections."""
        self._client.close()

    def _call(self, command: Callable[[], T]) -> T:
        try:
            result = command()
        except STORE_FAILURES as error:
            raise self._health.down(error) from None
        self._health.up()
        return result


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
