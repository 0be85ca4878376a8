"""The private tier's signature state: registered signers and the nonces already answered.

``SignerRegistry`` maps an API key id to the Ed25519 public key its customer registered (by the
operator, from an admin host, with ``splitvault keys signer-register``: never through the
public tier, which could register its own). ``NonceStore`` answers each signed request once.
``SqliteSignatureState`` implements both in ``STATE/signatures.sqlite3`` (0600, WAL, synced),
so a restart does not make a request answerable again. Each replica with its own state folder
has its own nonces; with several private replicas, ``open_signature_state`` gives the private
store's ``RedisSignatureState`` (``private_core.private_redis_signatures``) instead, shared by
all of them (README.md, "Several private replicas").
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from private_core.private_redis import StoreHealth, sync_client
from private_core.private_redis_settings import StateStoreSettings
from private_core.private_redis_signatures import RedisSignatureState
from shared.signatures import load_public_key, public_key_text
from shared.state_files import private_file

SIGNATURES_DB = "signatures.sqlite3"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS signers (
    key_id TEXT PRIMARY KEY,
    public_key TEXT NOT NULL,
    registered_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS nonces (
    key_id TEXT NOT NULL,
    nonce TEXT NOT NULL,
    created INTEGER NOT NULL,
    PRIMARY KEY (key_id, nonce)
);
CREATE INDEX IF NOT EXISTS nonces_by_created ON nonces (created);
"""


class SignerRegistry(Protocol):
    """Who may sign for which API key id.

    ``local_lookups``: ``public_key`` reads a local file in microseconds and never waits on a
    write, so the event loop may call it (else it is called in a worker thread).
    """

    local_lookups: bool

    def public_key(self, key_id: str) -> Ed25519PublicKey | None:
        """The key registered for ``key_id``, or None."""

    def register(self, key_id: str, public_key: Ed25519PublicKey) -> None:
        """Register (or replace) ``key_id``'s signer."""

    def remove(self, key_id: str) -> bool:
        """Remove ``key_id``'s signer; whether there was one."""

    def signers(self) -> dict[str, str]:
        """Every key id and its public key text."""


class NonceStore(Protocol):
    """Remembers answered (key id, nonce) pairs for as long as their time is accepted."""

    def use(self, key_id: str, nonce: str, created: int, *, forget_before: float) -> bool:
        """Record ``nonce``; False if it was recorded before. Pairs created before
        ``forget_before`` may be dropped (their time is refused anyway)."""


class SignatureState(SignerRegistry, NonceStore, Protocol):
    """Both, in one store that is closed with the tier."""

    def close(self) -> None:
        """Release the store."""


def open_signature_state(
    store: StateStoreSettings, state_dir: Path, window_s: float
) -> SignatureState:
    """The private store's shared state when one is configured, else ``STATE/signatures.sqlite3``."""
    if store.redis_url is None:
        return SqliteSignatureState(state_dir / SIGNATURES_DB)
    client = sync_client(store)
    return RedisSignatureState(client, prefix=store.prefix, window_s=window_s, health=StoreHealth())


class SqliteSignatureState:
    """``SignerRegistry`` and ``NonceStore`` in one SQLite file (safe across processes).

    Signer lookups use a connection of their own: in WAL mode a reader never waits for a nonce
    being written, and it sees every committed registration, this process's or the CLI's.
    """

    local_lookups = True

    def __init__(self, path: Path) -> None:
        private_file(path)
        self._db = sqlite3.connect(path, timeout=10.0, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a recorded nonce survives a crash or restart of the process (a power
        # cut may forget the last ones, as it may the trigger log's last records); FULL would
        # sync each request (about 10 ms here).
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()
        self._pruned = 0.0
        self._reader = sqlite3.connect(path, timeout=10.0, check_same_thread=False)
        self._read_lock = threading.Lock()

    def public_key(self, key_id: str) -> Ed25519PublicKey | None:
        with self._read_lock:
            row = self._reader.execute(
                "SELECT public_key FROM signers WHERE key_id = ?", (key_id,)
            ).fetchone()
        return None if row is None else load_public_key(row[0])

    def register(self, key_id: str, public_key: Ed25519PublicKey) -> None:
        with self._lock, self._db:
            self._db.execute(
                "INSERT OR REPLACE INTO signers VALUES (?, ?, ?)",
                (key_id, public_key_text(public_key), time.time()),
            )

    def remove(self, key_id: str) -> bool:
        with self._lock, self._db:
            cursor = self._db.execute("DELETE FROM signers WHERE key_id = ?", (key_id,))
        return cursor.rowcount > 0

    def signers(self) -> dict[str, str]:
        with self._lock:
            rows = self._db.execute("SELECT key_id, public_key FROM signers ORDER BY key_id")
            return dict(rows.fetchall())

    def use(self, key_id: str, nonce: str, created: int, *, forget_before: float) -> bool:
        with self._lock, self._db:
            if forget_before - self._pruned > 60:
                self._db.execute("DELETE FROM nonces WHERE created < ?", (forget_before,))
                self._pruned = forget_before
            cursor = self._db.execute(
                "INSERT OR IGNORE INTO nonces VALUES (?, ?, ?)", (key_id, nonce, created)
            )
        return cursor.rowcount == 1

    def close(self) -> None:
        """Close the database."""
        with self._lock, self._read_lock:
            self._reader.close()
            self._db.close()
