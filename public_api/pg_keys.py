"""``KeyStore`` in the replicas' shared PostgreSQL database (``public_api.pg_store``).

The same contract as ``SqliteKeyStore``: SHA-256 of the token only, constant-time comparison,
acceptances and monitor decisions beside the keys. A key created, revoked or blocked through any
replica (or ``splitvault keys``) is seen by every replica: a monitor decision at once (it is read
on every admission), a revocation within ``key_cache_s``.
"""

from __future__ import annotations

import builtins
import secrets
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool

from public_api.keys import (
    _DUMMY_HASH,
    _INVALID,
    DECISIONS,
    ApiKey,
    _check_limits,
    _key_row,
    hash_token,
    parse_key_id,
)
from public_api.pg_store import unavailable_on_error
from shared.errors import Unauthenticated

_INSERT = (
    "INSERT INTO keys (key_id, name, created_at, revoked_at, rate_per_s, burst, daily_quota, "
    "secret_sha256) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
)
_SELECT = (
    "SELECT key_id, name, created_at, revoked_at, rate_per_s, burst, daily_quota, secret_sha256 "
    "FROM keys "
)
_ACCEPTANCES = (
    "SELECT key_id, version, terms_sha256, client_address, accepted_at FROM terms_acceptances "
    "WHERE key_id = %s ORDER BY accepted_at, id"
)
_STORE = "API key store"


class PgKeyStore:
    """``KeyStore`` on a connection pool; safe to share between threads."""

    local_lookups = False

    def __init__(
        self,
        pool: ConnectionPool,
        *,
        clock: Callable[[], float] = time.time,
        owns_pool: bool = False,
    ) -> None:
        self._pool = pool
        self._clock = clock
        self._owns_pool = owns_pool

    def create(
        self,
        name: str,
        *,
        rate_per_s: float | None = None,
        burst: int | None = None,
        daily_quota: int | None = None,
    ) -> tuple[ApiKey, str]:
        """Issue a key named ``name`` (unique, else ``ValueError``); returns it and its secret."""
        _check_limits(name, rate_per_s, burst, daily_quota)
        for _ in range(8):  # a key id collision (1 in 4 billion per key) draws another
            key_id = f"k_{secrets.token_hex(4)}"
            token = f"sv_{key_id}_{secrets.token_urlsafe(32)}"
            key = ApiKey(key_id, name, self._clock(), None, rate_per_s, burst, daily_quota)
            try:
                with self._pool.connection() as conn:
                    conn.execute(
                        _INSERT,
                        (*_key_row(key), hash_token(token)),
                    )
            except psycopg.errors.UniqueViolation as error:
                if error.diag.constraint_name == "keys_name_key":
                    raise ValueError(f"an API key named {name!r} already exists") from None
                continue
            return key, token
        raise RuntimeError("could not draw an unused key id")

    def authenticate(self, token: str) -> ApiKey:
        """The key ``token`` belongs to; ``Unauthenticated`` if unknown, malformed or revoked."""
        digest = hash_token(token)
        key_id = parse_key_id(token)
        row = None
        if key_id is not None:
            with unavailable_on_error(_STORE), self._pool.connection() as conn:
                row = conn.execute(_SELECT + "WHERE key_id = %s", (key_id,)).fetchone()
        stored = row[-1] if row else _DUMMY_HASH
        if not secrets.compare_digest(digest, stored) or row is None:
            raise Unauthenticated(_INVALID)
        key = ApiKey(*row[:-1])
        if key.revoked:
            raise Unauthenticated(f"API key {key.key_id} was revoked")
        return key

    def list(self) -> builtins.list[ApiKey]:
        """Every key, revoked ones included, oldest first."""
        with self._pool.connection() as conn:
            rows = conn.execute(_SELECT + "ORDER BY created_at, key_id").fetchall()
        return [ApiKey(*row[:-1]) for row in rows]

    def revoke(self, key_id_or_name: str) -> ApiKey:
        """Revoke a key by id or name (``KeyError`` if none); a revoked key keeps its first time."""
        with self._pool.connection() as conn:
            row = conn.execute(
                _SELECT + "WHERE key_id = %s OR name = %s ORDER BY key_id = %s DESC LIMIT 1 "
                "FOR UPDATE",
                (key_id_or_name, key_id_or_name, key_id_or_name),
            ).fetchone()
            if row is None:
                raise KeyError(key_id_or_name)
            key = ApiKey(*row[:-1])
            if not key.revoked:
                key = replace(key, revoked_at=self._clock())
                conn.execute(
                    "UPDATE keys SET revoked_at = %s WHERE key_id = %s",
                    (key.revoked_at, key.key_id),
                )
        return key

    def get(self, key_id: str) -> ApiKey | None:
        """The key with this id, or ``None``."""
        with self._pool.connection() as conn:
            found = conn.execute(_SELECT + "WHERE key_id = %s", (key_id,)).fetchone()
        return ApiKey(*found[:-1]) if found else None

    def record_acceptance(
        self, key_id: str, version: str, terms_sha256: str, client_address: str, at: float
    ) -> None:
        """Record that ``key_id`` accepted terms ``version`` (``KeyError`` for an unknown key)."""
        try:
            with unavailable_on_error(_STORE), self._pool.connection() as conn:
                conn.execute(
                    "INSERT INTO terms_acceptances "
                    "(key_id, version, terms_sha256, client_address, accepted_at) "
                    "VALUES (%s, %s, %s, %s, %s)",
                    (key_id, version, terms_sha256, client_address, at),
                )
        except psycopg.errors.ForeignKeyViolation:
            raise KeyError(key_id) from None

    def accepted_version(self, key_id: str) -> str | None:
        """The terms version this key accepted most recently, or ``None``."""
        with unavailable_on_error(_STORE), self._pool.connection() as conn:
            row = conn.execute(
                "SELECT version FROM terms_acceptances WHERE key_id = %s "
                "ORDER BY accepted_at DESC, id DESC LIMIT 1",
                (key_id,),
            ).fetchone()
        return str(row[0]) if row else None

    def acceptances(self, key_id: str) -> builtins.list[dict[str, Any]]:
        """Every acceptance by this key, oldest first."""
        names = ("key_id", "version", "terms_sha256", "client_address", "accepted_at")
        with self._pool.connection() as conn:
            rows = conn.execute(_ACCEPTANCES, (key_id,)).fetchall()
        return [dict(zip(names, row, strict=True)) for row in rows]

    def monitor_decision(self, key_id: str) -> str | None:
        """The monitor's lasting decision on this key, or ``None`` (503 if unreadable)."""
        with unavailable_on_error(_STORE), self._pool.connection() as conn:
            row = conn.execute(
                "SELECT level FROM monitor_decisions WHERE key_id = %s", (key_id,)
            ).fetchone()
        return None if row is None else str(row[0])

    def record_monitor_decision(self, key_id: str, level: str, at: float) -> None:
        """Raise the key's decision to ``level``; a milder one than recorded changes nothing."""
        if level not in DECISIONS:
            raise ValueError(f"{level!r} is not a monitor decision ({', '.join(DECISIONS)})")
        try:
            with unavailable_on_error(_STORE), self._pool.connection() as conn:
                conn.execute(
                    "INSERT INTO monitor_decisions (key_id, level, decided_at) "
                    "VALUES (%s, %s, %s) ON CONFLICT (key_id) DO UPDATE SET "
                    "level = excluded.level, decided_at = excluded.decided_at "
                    "WHERE excluded.level = 'blocked' AND monitor_decisions.level <> 'blocked'",
                    (key_id, level, at),
                )
        except psycopg.errors.ForeignKeyViolation:
            raise KeyError(key_id) from None

    def clear_monitor_decision(self, key_id: str) -> None:
        """Lift the key's decision, if any."""
        with unavailable_on_error(_STORE), self._pool.connection() as conn:
            conn.execute("DELETE FROM monitor_decisions WHERE key_id = %s", (key_id,))

    def close(self) -> None:
        """Close the pool if this store owns it (a CLI command); a tier's pool is shared."""
        if self._owns_pool:
            self._pool.close()
