"""API keys: issued once, stored only as SHA-256 hashes, checked in constant time.

A key's secret is ``sv_<key_id>_<43 urlsafe base64 chars>`` (32 random bytes). The store keeps
the SHA-256 of the whole token: for a high-entropy token a fast hash is right (nothing to
brute-force), and the database never holds a usable secret. ``KeyStore`` is the interface;
``SqliteKeyStore`` is the embedded default under ``PUBLIC_DIR/state/keys.sqlite3``. The same
database records which terms-of-service version each key accepted, and the extraction monitor's
throttle and block decisions (``monitor_decisions``, so that they outlive the monitor's state in
Redis; the table is created in an existing file on open).
"""

from __future__ import annotations

import builtins
import hashlib
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from shared.errors import Unauthenticated, Unavailable
from shared.logs import get_logger
from shared.state_files import private_file

log = get_logger(__name__)

STATE_DIR = "state"
KEYS_DB = "keys.sqlite3"

_TOKEN = re.compile(r"sv_(k_[0-9a-f]{8})_([A-Za-z0-9_-]{43})")
_INVALID = "missing or invalid API key"
# Compared against when the key id is unknown, so a miss costs what a hit costs.
_DUMMY_HASH = hashlib.sha256(b"splitvault: no such key").hexdigest()

_SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    key_id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    secret_sha256 TEXT NOT NULL,
    created_at REAL NOT NULL,
    revoked_at REAL,
    rate_per_s REAL,
    burst INTEGER,
    daily_quota INTEGER
);
CREATE TABLE IF NOT EXISTS terms_acceptances (
    id INTEGER PRIMARY KEY,
    key_id TEXT NOT NULL REFERENCES keys (key_id),
    version TEXT NOT NULL,
    terms_sha256 TEXT NOT NULL,
    client_address TEXT NOT NULL,
    accepted_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS terms_acceptances_by_key ON terms_acceptances (key_id, accepted_at);
CREATE TABLE IF NOT EXISTS monitor_decisions (
    key_id TEXT PRIMARY KEY REFERENCES keys (key_id),
    level TEXT NOT NULL CHECK (level IN ('throttled', 'blocked')),
    decided_at REAL NOT NULL
);
"""
# The extraction monitor's lasting verdicts, mildest first: a key's decision only ever rises,
# until an operator clears it (``splitvault monitor clear``).
DECISIONS = ("throttled", "blocked")


@dataclass(frozen=True)
class ApiKey:
    """A key's public record; limits left ``None`` fall back to the model's configuration."""

    key_id: str
    name: str
    created_at: float
    revoked_at: float | None = None
    rate_per_s: float | None = None
    burst: int | None = None
    daily_quota: int | None = None

    @property
    def revoked(self) -> bool:
        """Whether the key was revoked."""
        return self.revoked_at is not None


class KeyStore(Protocol):
    """Where API keys and terms acceptances live; a server database can replace SQLite.

    ``local_lookups``: reads are a local file's, microseconds, so the event loop may make them
    (a server database's are network calls, made in a worker thread).
    """

    local_lookups: bool

    def create(
        self,
        name: str,
        *,
        rate_per_s: float | None = None,
        burst: int | None = None,
        daily_quota: int | None = None,
    ) -> tuple[ApiKey, str]:
        """Issue a key; the secret is returned here and never again."""
        ...

    def authenticate(self, token: str) -> ApiKey:
        """The live key ``token`` belongs to, or ``Unauthenticated``."""
        ...

    def list(self) -> builtins.list[ApiKey]:
        """Every key, revoked ones included, oldest first."""
        ...

    def revoke(self, key_id_or_name: str) -> ApiKey:
        """Revoke a key by id or name (``KeyError`` if none); revoking twice is harmless."""
        ...

    def get(self, key_id: str) -> ApiKey | None:
        """The key with this id, or ``None``."""
        ...

    def record_acceptance(
        self, key_id: str, version: str, terms_sha256: str, client_address: str, at: float
    ) -> None:
        """Record that ``key_id`` accepted terms ``version`` (``KeyError`` for an unknown key)."""
        ...

    def accepted_version(self, key_id: str) -> str | None:
        """The terms version this key accepted most recently, or ``None``."""
        ...

    def acceptances(self, key_id: str) -> builtins.list[dict[str, Any]]:
        """Every acceptance by this key, oldest first."""
        ...

    def monitor_decision(self, key_id: str) -> str | None:
        """The monitor's lasting decision on this key (one of ``DECISIONS``), or ``None``."""
        ...

    def record_monitor_decision(self, key_id: str, level: str, at: float) -> None:
        """Raise the key's decision to ``level`` (never lowers it; ``KeyError``: unknown key)."""
        ...

    def clear_monitor_decision(self, key_id: str) -> None:
        """Lift the key's decision (the operator's clear)."""
        ...

    def close(self) -> None:
        """Release the store's resources."""
        ...


@contextmanager
def _unavailable_on_storage_error() -> Iterator[None]:
    """A store that cannot be read now (disk failing or full, lock held) answers 503 + Retry-After
    on the hot path, not a 500; the cause is logged, not sent to the client."""
    try:
        yield
    except sqlite3.DatabaseError as error:
        log.error("key_store_unavailable", reason=str(error))
        raise Unavailable(
            "the API key store cannot be read now; retry later", retry_after_s=1.0
        ) from error


def hash_token(token: str) -> str:
    """SHA-256 (hex) of a whole API key token: the only form the store keeps."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def parse_key_id(token: str) -> str | None:
    """The key id inside a well-formed token, or ``None`` for anything else."""
    match = _TOKEN.fullmatch(token)
    return match.group(1) if match else None


class SqliteKeyStore:
    """``KeyStore`` in one SQLite file (WAL mode), safe to share between threads.

    Every call reads the database: the public tier caches recent callers in front of it
    (``public_api.key_cache``).
    """

    local_lookups = True

    def __init__(
        self,
        path: Path,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        private_file(path)  # 0600 before SQLite creates it 0644
        self.path = path
        self._clock = clock
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(_SCHEMA)

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

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
        with self._transaction() as db:
            if db.execute("SELECT 1 FROM keys WHERE name = ?", (name,)).fetchone():
                raise ValueError(f"an API key named {name!r} already exists")
            key_id = _new_key_id(db)
            token = f"sv_{key_id}_{secrets.token_urlsafe(32)}"
            key = ApiKey(key_id, name, self._clock(), None, rate_per_s, burst, daily_quota)
            db.execute(
                "INSERT INTO keys (key_id, name, created_at, revoked_at, rate_per_s, burst, "
                "daily_quota, secret_sha256) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (*_key_row(key), hash_token(token)),
            )
        return key, token

    def authenticate(self, token: str) -> ApiKey:
        """The key ``token`` belongs to; ``Unauthenticated`` if unknown, malformed or revoked."""
        digest = hash_token(token)
        with self._lock, _unavailable_on_storage_error():
            key_id = parse_key_id(token)
            row = None
            if key_id is not None:
                row = self._db.execute(
                    "SELECT key_id, name, created_at, revoked_at, rate_per_s, burst, daily_quota, "
                    "secret_sha256 FROM keys WHERE key_id = ?",
                    (key_id,),
                ).fetchone()
            stored = row[-1] if row else _DUMMY_HASH
            if not secrets.compare_digest(digest, stored) or row is None:
                raise Unauthenticated(_INVALID)
            key = ApiKey(*row[:-1])
            if key.revoked:
                raise Unauthenticated(f"API key {key.key_id} was revoked")
            return key

    def list(self) -> builtins.list[ApiKey]:
        """Every key, revoked ones included, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT key_id, name, created_at, revoked_at, rate_per_s, burst, daily_quota "
                "FROM keys ORDER BY created_at, key_id"
            ).fetchall()
        return [ApiKey(*row) for row in rows]

    def revoke(self, key_id_or_name: str) -> ApiKey:
        """Revoke a key by id or name (``KeyError`` if none); a revoked key keeps its first time."""
        with self._transaction() as db:
            row = db.execute(
                "SELECT key_id, name, created_at, revoked_at, rate_per_s, burst, daily_quota "
                "FROM keys WHERE key_id = ? OR name = ? "
                "ORDER BY key_id = ? DESC LIMIT 1",
                (key_id_or_name, key_id_or_name, key_id_or_name),
            ).fetchone()
            if row is None:
                raise KeyError(key_id_or_name)
            key = ApiKey(*row)
            if not key.revoked:
                key = replace(key, revoked_at=self._clock())
                db.execute(
                    "UPDATE keys SET revoked_at = ? WHERE key_id = ?", (key.revoked_at, key.key_id)
                )
        return key

    def get(self, key_id: str) -> ApiKey | None:
        """The key with this id, or ``None``."""
        with self._lock:
            row = self._db.execute(
                "SELECT key_id, name, created_at, revoked_at, rate_per_s, burst, daily_quota "
                "FROM keys WHERE key_id = ?",
                (key_id,),
            ).fetchone()
        return ApiKey(*row) if row else None

    def record_acceptance(
        self, key_id: str, version: str, terms_sha256: str, client_address: str, at: float
    ) -> None:
        """Record that ``key_id`` accepted terms ``version`` (``KeyError`` for an unknown key)."""
        with self._transaction() as db:
            if not db.execute("SELECT 1 FROM keys WHERE key_id = ?", (key_id,)).fetchone():
                raise KeyError(key_id)
            db.execute(
                "INSERT INTO terms_acceptances "
                "(key_id, version, terms_sha256, client_address, accepted_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (key_id, version, terms_sha256, client_address, at),
            )

    def accepted_version(self, key_id: str) -> str | None:
        """The terms version this key accepted most recently, or ``None``."""
        with self._lock, _unavailable_on_storage_error():
            row = self._db.execute(
                "SELECT version FROM terms_acceptances WHERE key_id = ? "
                "ORDER BY accepted_at DESC, id DESC LIMIT 1",
                (key_id,),
            ).fetchone()
        return str(row[0]) if row else None

    def acceptances(self, key_id: str) -> builtins.list[dict[str, Any]]:
        """Every acceptance by this key, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT key_id, version, terms_sha256, client_address, accepted_at "
                "FROM terms_acceptances WHERE key_id = ? ORDER BY accepted_at, id",
                (key_id,),
            ).fetchall()
        names = ("key_id", "version", "terms_sha256", "client_address", "accepted_at")
        return [dict(zip(names, row, strict=True)) for row in rows]

    def monitor_decision(self, key_id: str) -> str | None:
        """The monitor's lasting decision on this key, or ``None`` (503 if unreadable)."""
        with self._lock, _unavailable_on_storage_error():
            row = self._db.execute(
                "SELECT level FROM monitor_decisions WHERE key_id = ?", (key_id,)
            ).fetchone()
        return None if row is None else str(row[0])

    def record_monitor_decision(self, key_id: str, level: str, at: float) -> None:
        """Raise the key's decision to ``level``; a milder one than recorded changes nothing."""
        if level not in DECISIONS:
            raise ValueError(f"{level!r} is not a monitor decision ({', '.join(DECISIONS)})")
        with _unavailable_on_storage_error(), self._transaction() as db:
            if not db.execute("SELECT 1 FROM keys WHERE key_id = ?", (key_id,)).fetchone():
                raise KeyError(key_id)
            db.execute(
                "INSERT INTO monitor_decisions (key_id, level, decided_at) VALUES (?, ?, ?) "
                "ON CONFLICT (key_id) DO UPDATE SET level = excluded.level, "
                "decided_at = excluded.decided_at "
                "WHERE excluded.level = 'blocked' AND monitor_decisions.level <> 'blocked'",
                (key_id, level, at),
            )

    def clear_monitor_decision(self, key_id: str) -> None:
        """Lift the key's decision, if any."""
        with _unavailable_on_storage_error(), self._transaction() as db:
            db.execute("DELETE FROM monitor_decisions WHERE key_id = ?", (key_id,))

    def close(self) -> None:
        """Close the database connection."""
        with self._lock:
            self._db.close()


def _new_key_id(db: sqlite3.Connection) -> str:
    while True:
        key_id = f"k_{secrets.token_hex(4)}"
        if not db.execute("SELECT 1 FROM keys WHERE key_id = ?", (key_id,)).fetchone():
            return key_id


def _key_row(key: ApiKey) -> tuple[Any, ...]:
    return (
        key.key_id,
        key.name,
        key.created_at,
        key.revoked_at,
        key.rate_per_s,
        key.burst,
        key.daily_quota,
    )


def _check_limits(
    name: str, rate_per_s: float | None, burst: int | None, daily_quota: int | None
) -> None:
    if not name.strip():
        raise ValueError("an API key needs a non-empty name")
    if rate_per_s is not None and not rate_per_s > 0:
        raise ValueError(f"rate must be positive, got {rate_per_s}")
    if burst is not None and burst < 1:
        raise ValueError(f"burst must be at least 1, got {burst}")
    if daily_quota is not None and daily_quota < 0:
        raise ValueError(f"daily quota must not be negative, got {daily_quota}")
