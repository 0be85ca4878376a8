"""Audit records, their hash chain and its storage in SQLite; checking and exporting a trail.

Each row holds ``seq`` (1, 2, 3, ... with no gaps), the request's fields, ``prev_hash`` (the
previous row's hash; 64 zeros for the first) and ``hash``, the SHA-256 of the canonical JSON of
``seq``, the fields and ``prev_hash``. ``verify_chain`` finds an edited, removed, inserted or
reordered row and says where.

A plain chain has one limit: someone who can write the file may truncate its tail, or edit a row
and recompute every later hash, and the chain still verifies. Anchoring closes that for the
records an anchor covers: ``public_api.audit_anchor`` has the private tier countersign the head
(``committed_head``) in its own ledger, and ``public_api.audit_coverage`` checks a trail against
those anchors. The trail's ``chain_id`` and the receipts live beside the records
(``public_api.audit_receipts``); admission gates (``add_admission_gate``) let the anchorer
refuse new requests while too much of the trail is unanchored.

The writer that commits records (``AuditTrail``) is in ``public_api.audit_writer``; counted
refusals (``RefusalTally``) in ``public_api.audit_tally``.

``count`` (the requests a record stands for) enters the hash only when it is not 1, so records
written before the field existed still verify.
"""

from __future__ import annotations

import hashlib
import json
import math
import operator
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from public_api import audit_receipts
from public_api.audit_source import GENESIS_HASH as GENESIS_HASH  # re-exported
from public_api.audit_source import TrailSource, as_source, sqlite_head
from shared.state_files import private_file

AUDIT_DB = "audit.sqlite3"
DECISIONS = frozenset(
    {
        "served",
        "unauthenticated",
        "forbidden",
        "terms_required",
        "rate_limited",
        "quota_exceeded",
        "blocked",
        "bad_request",
        "unavailable",
        "error",
        "closed",  # the connection closed before an answer: read deadline (408) or client (499)
    }
)


@dataclass(frozen=True)
class AuditRecord:
    """One request as the trail keeps it; ``answer`` is the compact JSON returned, if any."""

    time: float
    key_id: str | None
    client: str
    model: str | None
    input_sha256: str | None
    answer: str | None
    decision: str
    status: int
    monitor_score: float | None = None
    request_id: str | None = None
    count: int = 1  # requests this record stands for (more than 1: aggregated refusals)

    def __post_init__(self) -> None:
        if self.decision not in DECISIONS:
            raise ValueError(f"unknown audit decision {self.decision!r}")
        if self.count < 1:
            raise ValueError("audit count must be at least 1")
        if not math.isfinite(self.time):
            raise ValueError("audit time must be finite")
        if self.monitor_score is not None and not math.isfinite(self.monitor_score):
            raise ValueError("monitor score must be finite or None")
        # Store exactly what SQLite gives back, so the hash is recomputed byte for byte.
        object.__setattr__(self, "time", float(self.time))
        object.__setattr__(self, "status", int(self.status))
        object.__setattr__(self, "count", int(self.count))
        if self.monitor_score is not None:
            object.__setattr__(self, "monitor_score", float(self.monitor_score))


_FIELDS = tuple(field.name for field in fields(AuditRecord))
_values_of = operator.attrgetter(*_FIELDS)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY,
    time REAL NOT NULL,
    key_id TEXT,
    client TEXT NOT NULL,
    model TEXT,
    input_sha256 TEXT,
    answer TEXT,
    decision TEXT NOT NULL,
    status INTEGER NOT NULL,
    monitor_score REAL,
    request_id TEXT,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL,
    count INTEGER NOT NULL DEFAULT 1
);
CREATE INDEX IF NOT EXISTS audit_by_key ON audit (key_id, seq);
"""
_INSERT = (
    "INSERT INTO audit (seq, time, key_id, client, model, input_sha256, answer, decision, status, "
    "monitor_score, request_id, count, prev_hash, hash) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


class TrailStorage(Protocol):
    """Where a writer commits its records: SQLite here, PostgreSQL in ``public_api.pg_audit``."""

    def commit(self, batch: list[AuditRecord]) -> tuple[int, str]:
        """Chain ``batch`` on the stored head and commit it in one transaction (rolled back on
        failure); returns the new head's seq and hash."""
        ...

    def close(self) -> None:
        """Release the storage."""
        ...


def chain_rows(
    batch: list[AuditRecord], seq: int, prev_hash: str
) -> tuple[list[tuple[Any, ...]], int, str]:
    """Rows ``(seq, *fields, prev_hash, hash)`` of ``batch`` chained after ``(seq, prev_hash)``,
    and the new head."""
    rows = []
    for record in batch:
        seq += 1
        values = dict(zip(_FIELDS, _values_of(record), strict=True))
        digest = record_hash(seq, values, prev_hash)
        rows.append((seq, *values.values(), prev_hash, digest))
        prev_hash = digest
    return rows, seq, prev_hash


class SqliteTrailStorage:
    """``TrailStorage`` in one SQLite file (another process may share it)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def commit(self, batch: list[AuditRecord]) -> tuple[int, str]:
        try:
            self._db.execute("BEGIN IMMEDIATE")
            # Read the head inside the write lock: another process may share this file.
            rows, seq, prev_hash = chain_rows(batch, *sqlite_head(self._db))
            self._db.executemany(_INSERT, rows)
            self._db.execute("COMMIT")
        except Exception:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise
        return seq, prev_hash

    def close(self) -> None:
        self._db.close()


def open_sqlite_storage(
    path: Path, busy_timeout_s: float = 5.0
) -> tuple[SqliteTrailStorage, str, tuple[int, str]]:
    """Open (or create) the SQLite trail at ``path``: its storage, chain id and committed head."""
    private_file(path)  # 0600 before SQLite creates it 0644
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    try:
        db.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.executescript(_SCHEMA)
        _migrate(db)
        chain_id = audit_receipts.prepare(db)
        committed = sqlite_head(db)
    except sqlite3.Error:
        db.close()
        raise
    return SqliteTrailStorage(db), chain_id, committed


@dataclass(frozen=True)
class VerifyResult:
    """The outcome of ``verify_chain``: ``records`` rows in all, the first bad one and why."""

    ok: bool
    records: int
    first_bad_seq: int | None = None
    problem: str | None = None


def record_hash(seq: int, values: dict[str, Any], prev_hash: str) -> str:
    """SHA-256 (hex) of the canonical JSON of ``seq``, the record's fields and ``prev_hash``.

    ``count`` is left out when it is 1 (see the module docstring).
    """
    payload = {**_hashed(values), "seq": seq, "prev_hash": prev_hash}
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _hashed(values: dict[str, Any]) -> dict[str, Any]:
    """The fields that enter the hash (and an export): ``count`` only when it is not 1."""
    if values.get("count", 1) == 1:
        return {name: value for name, value in values.items() if name != "count"}
    return values


def _migrate(db: sqlite3.Connection) -> None:
    """Add ``count`` to a trail created before it existed (its rows stand for one request)."""
    columns = {row[1] for row in db.execute("PRAGMA table_info(audit)")}
    if "count" not in columns:
        try:
            db.execute("ALTER TABLE audit ADD COLUMN count INTEGER NOT NULL DEFAULT 1")
        except sqlite3.OperationalError as error:  # another process added it meanwhile
            if "duplicate column" not in str(error):
                raise


def head(trail: Path | TrailSource) -> tuple[int, str]:
    """The last record's seq and hash (``(0, GENESIS_HASH)`` when empty): the value to anchor."""
    return as_source(trail).head()


def verify_chain(trail: Path | TrailSource) -> VerifyResult:
    """Check seq numbering, every ``prev_hash`` link and every hash; stop at the first problem."""
    source = as_source(trail)
    try:
        total = source.count()
    except sqlite3.OperationalError as error:
        return VerifyResult(False, 0, None, f"the audit table cannot be read: {error}")
    expected, prev_hash = 1, GENESIS_HASH
    for seq, *values, stored_prev, stored_hash in source.rows():
        problem = _row_problem(seq, values, stored_prev, stored_hash, expected, prev_hash)
        if problem is not None:
            bad = expected if seq != expected else seq
            return VerifyResult(False, total, bad, problem)
        expected, prev_hash = seq + 1, stored_hash
    return VerifyResult(True, total)


def _row_problem(
    seq: int, values: list[Any], stored_prev: str, stored_hash: str, expected: int, prev: str
) -> str | None:
    if seq != expected:
        if expected == 1:
            return f"record 1 missing (the trail starts at record {seq})"
        missing = f"record {expected}" if seq == expected + 1 else f"records {expected}-{seq - 1}"
        return f"{missing} missing (gap after {expected - 1})"
    if stored_prev != prev:
        before = "the genesis hash" if seq == 1 else f"the hash of record {seq - 1}"
        return (
            f"record {seq}: prev_hash does not match {before} "
            "(a record was altered, inserted, removed or reordered)"
        )
    try:
        computed = record_hash(seq, dict(zip(_FIELDS, values, strict=True)), stored_prev)
    except (TypeError, ValueError):  # a BLOB or other value the writer never stores
        return f"record {seq}: a field holds a value the trail never writes"
    if computed != stored_hash:
        return f"record {seq}: hash does not match its contents"
    return None


def export_records(trail: Path | TrailSource, key_id: str) -> Iterator[dict[str, Any]]:
    """Every record of ``key_id`` in seq order, as JSON-serialisable dicts with their hashes."""
    names = ("seq", *_FIELDS, "prev_hash", "hash")
    for row in as_source(trail).key_rows(key_id):
        yield _hashed(dict(zip(names, row, strict=True)))


def input_digest(arrays: dict[str, np.ndarray[Any, Any]]) -> str:
    """SHA-256 (hex) over the inputs: sorted names, each with dtype, shape and raw bytes."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        array = np.asarray(arrays[name])
        if array.dtype.hasobject:
            raise ValueError(f"input {name!r} has an object dtype; it has no canonical bytes")
        header = json.dumps(
            {"name": name, "dtype": array.dtype.str, "shape": list(array.shape)},
            sort_keys=True,
            separators=(",", ":"),
        ).encode("utf-8")
        digest.update(len(header).to_bytes(8, "big") + header)
        digest.update(array.nbytes.to_bytes(8, "big"))
        contiguous = array if array.flags.c_contiguous else np.ascontiguousarray(array)
        digest.update(contiguous.data)
    return digest.hexdigest()
