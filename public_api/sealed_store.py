"""The sealed request bodies of the public tier, in SQLite (``STATE/sealed.sqlite3``, 0600).

One row per served request: when, which API key and model, the request id, the SHA-256 of the
exact body (hex) and its size, the owner key that sealed it and the sealed body (RFC 9180
HPKE, see ``public_api.sealing``), how the body is encoded (``content_type``: v2 JSON, v2
binary tensors, a gRPC ``ModelInferRequest``...) and, for a request the customer signed, the
signature's nonce (which links the body to the private tier's record of that signature). The
public tier can count, bound and delete rows; only the owner's private key, kept off both
tiers, opens them. Stores made before ``content_type`` and ``signature_nonce`` gain both
columns, empty, when opened.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from shared.state_files import private_file

SEALED_DB = "sealed.sqlite3"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS sealed (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL,
    key_id TEXT NOT NULL,
    model TEXT NOT NULL,
    request_id TEXT NOT NULL,
    body_sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    owner_key_id TEXT NOT NULL,
    sealed BLOB NOT NULL,
    content_type TEXT NOT NULL DEFAULT '',
    signature_nonce TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS sealed_by_key ON sealed (key_id, id);
CREATE INDEX IF NOT EXISTS sealed_by_time ON sealed (time);
"""
_ADDED = {"content_type": "TEXT NOT NULL DEFAULT ''", "signature_nonce": "TEXT NOT NULL DEFAULT ''"}
_INSERT = (
    "INSERT INTO sealed (time, key_id, model, request_id, body_sha256, size, owner_key_id, "
    "sealed, content_type, signature_nonce) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_SELECT = (
    "SELECT time, key_id, model, request_id, body_sha256, size, owner_key_id, sealed, "
    "content_type, signature_nonce FROM sealed WHERE ? IS NULL OR key_id = ? ORDER BY id"
)
_SELECT_LEGACY = (  # a store written before content types, read without changing it
    "SELECT time, key_id, model, request_id, body_sha256, size, owner_key_id, sealed, '', '' "
    "FROM sealed WHERE ? IS NULL OR key_id = ? ORDER BY id"
)


@dataclass(frozen=True)
class SealedRecord:
    """One sealed body and what the public tier knows of it (never the body itself)."""

    time: float
    key_id: str  # "" when no API key was required
    model: str
    request_id: str
    body_sha256: str  # hex SHA-256 of the exact body bytes
    size: int  # bytes of the body
    owner_key_id: str  # the owner public key it was sealed to
    sealed: bytes
    content_type: str = ""  # how the body is encoded (``public_api.sealing``); "": v2 JSON
    signature_nonce: str = ""  # the customer's request signature's nonce; "": unsigned


@dataclass(frozen=True)
class Retention:
    """Bounds per API key."""

    max_records: int
    max_bytes: int
    max_age_s: float


class SealedStore:
    """Writes and bounds sealed rows; one connection, used by one writer thread."""

    def __init__(self, path: Path, retention: Retention) -> None:
        private_file(path)  # 0600 before SQLite creates it 0644
        self.path, self.retention = path, retention
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        try:
            self._db.execute("PRAGMA busy_timeout=5000")
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(_SCHEMA)
            _add_columns(self._db)
        except sqlite3.Error:
            self._db.close()
            raise

    def insert(self, records: Sequence[SealedRecord], now: float | None = None) -> int:
        """Insert ``records`` in one transaction, then enforce retention on their keys;
        returns the rows deleted by retention."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.executemany(
                _INSERT,
                [_row(record) for record in records],
            )
            deleted = self._expire(now if now is not None else time.time())
            for key_id in sorted({record.key_id for record in records}):
                deleted += self._bound(key_id)
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        return deleted

    def close(self) -> None:
        """Close the connection."""
        self._db.close()

    def _expire(self, now: float) -> int:
        cursor = self._db.execute(
            "DELETE FROM sealed WHERE time < ?", (now - self.retention.max_age_s,)
        )
        return cursor.rowcount

    def _bound(self, key_id: str) -> int:
        """Delete the key's oldest rows beyond its record and byte bounds."""
        rows = self._db.execute(
            "SELECT id, size FROM sealed WHERE key_id = ? ORDER BY id DESC", (key_id,)
        ).fetchall()
        kept = total = 0
        for row_id, size in rows:
            if kept + 1 > self.retention.max_records or total + size > self.retention.max_bytes:
                cursor = self._db.execute(
                    "DELETE FROM sealed WHERE key_id = ? AND id <= ?", (key_id, row_id)
                )
                return cursor.rowcount
            kept, total = kept + 1, total + size
        return 0


def _row(record: SealedRecord) -> tuple[object, ...]:
    return (
        record.time,
        record.key_id,
        record.model,
        record.request_id,
        record.body_sha256,
        record.size,
        record.owner_key_id,
        record.sealed,
        record.content_type,
        record.signature_nonce,
    )


def _add_columns(db: sqlite3.Connection) -> None:
    """Add the columns a store made by an earlier version lacks."""
    present = {row[1] for row in db.execute("PRAGMA table_info(sealed)")}
    for name, kind in _ADDED.items():
        if name not in present:
            db.execute(f"ALTER TABLE sealed ADD COLUMN {name} {kind}")


def _read_only(path: Path) -> sqlite3.Connection:
    if not path.is_file():
        raise FileNotFoundError(f"no sealed request bodies at {path}")
    return sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)


def read_sealed(path: Path, key_id: str | None = None) -> Iterator[SealedRecord]:
    """The sealed rows (of ``key_id``, or all), oldest first."""
    with closing(_read_only(path)) as db:
        present = {row[1] for row in db.execute("PRAGMA table_info(sealed)")}
        select = _SELECT if present.issuperset(_ADDED) else _SELECT_LEGACY
        for row in db.execute(select, (key_id, key_id)):
            yield SealedRecord(*row)


def summary(path: Path) -> list[tuple[str, int, int, float, float]]:
    """Per key: (key id, rows, body bytes, first time, last time)."""
    with closing(_read_only(path)) as db:
        return db.execute(
            "SELECT key_id, count(*), sum(size), min(time), max(time) FROM sealed "
            "GROUP BY key_id ORDER BY key_id"
        ).fetchall()


def delete_key(path: Path, key_id: str) -> int:
    """Delete every sealed body of ``key_id``; returns how many."""
    if not path.is_file():
        raise FileNotFoundError(f"no sealed request bodies at {path}")
    with closing(sqlite3.connect(path, isolation_level=None)) as db:
        db.execute("PRAGMA busy_timeout=5000")
        deleted = db.execute("DELETE FROM sealed WHERE key_id = ?", (key_id,)).rowcount
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the deleted pages leave the WAL too
        db.execute("VACUUM")
    return int(deleted)
