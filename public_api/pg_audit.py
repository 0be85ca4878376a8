"""The audit trail in the replicas' shared PostgreSQL database: one chain per replica.

Each replica (``replica_name``) writes its own hash chain (``audit_chains`` gives it a random
``chain_id`` once; its records are ``audit`` rows of that chain, seq 1, 2, 3, ...), anchored in
the private tier's ledger under that chain id exactly as a SQLite trail is. Replicas never wait
for one another: a commit locks only its own chain's row (``FOR UPDATE``), so two processes that
share a replica name still chain correctly, one after the other.

Verification reads one chain through ``PgTrailSource`` (a ``TrailSource``); ``chains`` lists
them all.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterable, Iterator
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool

from public_api.audit import AuditRecord, chain_rows
from public_api.audit_source import GENESIS_HASH
from public_api.audit_writer import AuditTrail
from public_api.pg_store import unavailable_on_error
from shared.anchor_receipt import AnchorReceipt

_INSERT = (
    "INSERT INTO audit (chain_id, seq, time, key_id, client, model, input_sha256, answer, "
    "decision, status, monitor_score, request_id, count, prev_hash, hash) "
    "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
)
_SELECT = (
    "SELECT seq, time, key_id, client, model, input_sha256, answer, decision, status, "
    "monitor_score, request_id, count, prev_hash, hash FROM audit WHERE chain_id = %s "
)
_HEAD = "SELECT seq, hash FROM audit WHERE chain_id = %s ORDER BY seq DESC LIMIT 1"
Conn = psycopg.Connection[Any]


def chain_of(conn: Conn, replica: str) -> str:
    """The chain id of ``replica``, made once (concurrent first calls agree on one)."""
    conn.execute(
        "INSERT INTO audit_chains (replica, chain_id, created_at) VALUES (%s, %s, %s) "
        "ON CONFLICT (replica) DO NOTHING",
        (replica, secrets.token_hex(16), time.time()),
    )
    row = conn.execute("SELECT chain_id FROM audit_chains WHERE replica = %s", (replica,))
    return str(row.fetchone()[0])  # type: ignore[index]


def chains(conn: Conn) -> list[tuple[str, str]]:
    """Every (replica, chain id) in the database, oldest first."""
    rows = conn.execute("SELECT replica, chain_id FROM audit_chains ORDER BY created_at, replica")
    return [(str(replica), str(chain)) for replica, chain in rows.fetchall()]


def open_pg_trail(pool: ConnectionPool, replica: str, **options: Any) -> AuditTrail:
    """``replica``'s trail in the database behind ``pool``, its writer started (``options``:
    those of ``AuditTrail.begin``)."""
    with pool.connection() as conn:
        chain_id = chain_of(conn, replica)
        row = conn.execute(_HEAD, (chain_id,)).fetchone()
    committed = (int(row[0]), str(row[1])) if row else (0, GENESIS_HASH)
    return AuditTrail.begin(PgTrailStorage(pool, chain_id), chain_id, committed, **options)


class PgTrailStorage:
    """``TrailStorage`` of one chain; the pool is closed by whoever opened it."""

    def __init__(self, pool: ConnectionPool, chain_id: str) -> None:
        self._pool = pool
        self._chain_id = chain_id

    def commit(self, batch: list[AuditRecord]) -> tuple[int, str]:
        with self._pool.connection() as conn:  # one transaction, committed on leaving
            conn.execute(
                "SELECT 1 FROM audit_chains WHERE chain_id = %s FOR UPDATE", (self._chain_id,)
            )
            row = conn.execute(_HEAD, (self._chain_id,)).fetchone()
            head = (int(row[0]), str(row[1])) if row else (0, GENESIS_HASH)
            rows, seq, prev_hash = chain_rows(batch, *head)
            with conn.cursor() as cursor:
                cursor.executemany(_INSERT, [(self._chain_id, *values) for values in rows])
        return seq, prev_hash

    def close(self) -> None:
        """Nothing of its own."""


class PgReceipts:
    """``ReceiptStore`` in ``audit_anchors`` of the shared database."""

    def __init__(self, pool: ConnectionPool) -> None:
        self._pool = pool

    def last_anchored(self, chain_id: str) -> int:
        with self._pool.connection() as conn:
            row = conn.execute(
                "SELECT max(seq) FROM audit_anchors WHERE chain_id = %s", (chain_id,)
            ).fetchone()
        return int(row[0] or 0) if row else 0

    def store(self, receipt: AnchorReceipt) -> None:
        with unavailable_on_error("audit receipts store"), self._pool.connection() as conn:
            conn.execute(
                "INSERT INTO audit_anchors (chain_id, seq, head, receipt) VALUES (%s, %s, %s, %s) "
                "ON CONFLICT (chain_id, seq) DO UPDATE SET head = excluded.head, "
                "receipt = excluded.receipt",
                (receipt.chain_id, receipt.seq, receipt.head, json.dumps(receipt.to_json())),
            )


class PgTrailSource:
    """``TrailSource`` of one chain, read through ``conn``."""

    def __init__(self, conn: Conn, chain_id: str, label: str) -> None:
        self._conn = conn
        self._chain_id = chain_id
        self._label = label

    @property
    def name(self) -> str:
        return self._label

    def count(self) -> int:
        row = self._conn.execute(
            "SELECT count(*) FROM audit WHERE chain_id = %s", (self._chain_id,)
        ).fetchone()
        return int(row[0]) if row else 0

    def rows(self) -> Iterator[tuple[Any, ...]]:
        yield from self._conn.cursor().stream(_SELECT + "ORDER BY seq", (self._chain_id,))

    def key_rows(self, key_id: str) -> Iterator[tuple[Any, ...]]:
        query = _SELECT + "AND key_id = %s ORDER BY seq"
        yield from self._conn.cursor().stream(query, (self._chain_id, key_id))

    def head(self) -> tuple[int, str]:
        row = self._conn.execute(_HEAD, (self._chain_id,)).fetchone()
        return (int(row[0]), str(row[1])) if row else (0, GENESIS_HASH)

    def hashes(self, seqs: Iterable[int]) -> dict[int, str]:
        rows = self._conn.execute(
            "SELECT seq, hash FROM audit WHERE chain_id = %s AND seq = ANY(%s)",
            (self._chain_id, sorted(seqs)),
        ).fetchall()
        return {int(seq): str(digest) for seq, digest in rows}

    def chain_id(self) -> str | None:
        return self._chain_id

    def receipts(self) -> Iterator[tuple[int, str, str]]:
        rows = self._conn.execute(
            "SELECT seq, head, receipt FROM audit_anchors WHERE chain_id = %s ORDER BY seq",
            (self._chain_id,),
        ).fetchall()
        for seq, head, text in rows:
            yield int(seq), str(head), str(text)
