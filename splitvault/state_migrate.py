"""``splitvault state migrate --from sqlite``: one host's SQLite state into the shared PostgreSQL.

Moves the API keys (their SHA-256 only), terms acceptances, the monitor's lasting decisions and
the audit trail, in one PostgreSQL transaction: all of it or nothing.

The audit chain moves as it is, re-anchored by continuation rather than rewritten: its records
keep their seq, ``prev_hash`` and hash (the hash covers neither the chain id nor the storage),
the chain keeps its ``chain_id``, and its anchor receipts move beside it. So every anchor the
private ledger already holds for the old chain covers the same records in PostgreSQL, unchanged;
the chain is given to one replica (``--replica``), which appends record n+1 after the old head
and anchors forward under the same chain id (the ledger accepts anchors that move forward only,
so a SQLite tier still writing the old file after the move would be refused as a fork: stop the
public tier first). Records after the old trail's last anchor are covered by the replica's next
anchor. The copy is checked before commit: the SQLite chain must verify, and the PostgreSQL
head must equal the SQLite head.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import tomllib
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.layout import DeployLayout
from shared.logs import get_logger
from splitvault.state_access import ENV_PREFIX

log = get_logger(__name__)

_KEYS = (
    "SELECT key_id, name, created_at, revoked_at, rate_per_s, burst, daily_quota, secret_sha256 "
    "FROM keys ORDER BY created_at, key_id"
)
_ACCEPTANCES = (
    "SELECT key_id, version, terms_sha256, client_address, accepted_at FROM terms_acceptances "
    "ORDER BY id"
)
_DECISIONS = "SELECT key_id, level, decided_at FROM monitor_decisions ORDER BY key_id"
_BATCH = 1000


@dataclass
class Moved:
    """What one migration copied."""

    keys: int = 0
    acceptances: int = 0
    decisions: int = 0
    records: int = 0
    receipts: int = 0
    chain_id: str | None = None
    head: tuple[int, str] | None = None
    replica: str = ""

    def lines(self) -> list[str]:
        """What the command prints."""
        out = [
            f"moved {self.keys} API keys, {self.acceptances} terms acceptances, "
            f"{self.decisions} monitor decisions"
        ]
        if self.chain_id is None:
            return [*out, "no audit trail to move"]
        assert self.head is not None
        out.append(
            f"moved audit chain {self.chain_id}: {self.records} records, {self.receipts} anchor "
            f"receipts; head: record {self.head[0]}, hash {self.head[1]}"
        )
        out.append(
            f"replica {self.replica!r} continues this chain; the private ledger's anchors of it "
            "cover the same records in PostgreSQL"
        )
        return out


def default_replica(deploy: Path) -> str:
    """The replica name the public tier of ``deploy`` is configured with (as the tier reads it:
    environment, then ``public.toml``, then the host name)."""
    named = os.environ.get(f"{ENV_PREFIX}REPLICA_NAME")
    path = DeployLayout(deploy).public_config
    if not named and path.is_file():
        named = tomllib.loads(path.read_text("utf-8")).get("replica_name")
    return str(named or socket.gethostname())


def migrate_sqlite(state_dir: Path, dsn: str, replica: str) -> Moved:
    """Copy the SQLite state in ``state_dir`` into the database at ``dsn`` (schema migrated
    first); ``ValueError`` if the trail does not verify or the database already holds any of it."""
    import psycopg

    from public_api.keys import KEYS_DB
    from public_api.pg_store import migrate

    migrate(dsn)
    moved = Moved(replica=replica)
    with psycopg.connect(dsn) as conn, conn.transaction():
        keys = state_dir / KEYS_DB
        if keys.is_file():
            with _read_only(keys) as db:
                _move_keys(db, conn, moved)
        _move_audit(state_dir, conn, moved)
    log.info(
        "state_migrated_from_sqlite",
        keys=moved.keys,
        records=moved.records,
        chain_id=moved.chain_id,
        replica=replica,
    )
    return moved


def _move_keys(db: sqlite3.Connection, conn: Any, moved: Moved) -> None:
    import psycopg

    from public_api.pg_keys import _INSERT

    rows = db.execute(_KEYS).fetchall()
    try:
        with conn.cursor() as cursor:
            cursor.executemany(_INSERT, rows)
    except psycopg.errors.UniqueViolation as error:
        raise ValueError(
            f"the database already holds an API key of this host ({error.diag.message_detail}): "
            "nothing was moved"
        ) from None
    acceptances = db.execute(_ACCEPTANCES).fetchall()
    decisions = db.execute(_DECISIONS).fetchall() if _has_table(db, "monitor_decisions") else []
    with conn.cursor() as cursor:
        cursor.executemany(
            "INSERT INTO terms_acceptances (key_id, version, terms_sha256, client_address, "
            "accepted_at) VALUES (%s, %s, %s, %s, %s)",
            acceptances,
        )
        cursor.executemany(
            "INSERT INTO monitor_decisions (key_id, level, decided_at) VALUES (%s, %s, %s)",
            decisions,
        )
    moved.keys, moved.acceptances, moved.decisions = len(rows), len(acceptances), len(decisions)


def _move_audit(state_dir: Path, conn: Any, moved: Moved) -> None:
    from public_api.audit import AUDIT_DB, head, verify_chain
    from public_api.audit_source import SqliteTrailSource
    from public_api.pg_audit import _HEAD
    from public_api.pg_audit import _INSERT as AUDIT_INSERT

    path = state_dir / AUDIT_DB
    if not path.is_file():
        return
    source = SqliteTrailSource(path)
    result = verify_chain(source)
    if not result.ok:
        raise ValueError(f"the audit trail {path} does not verify ({result.problem}): not moved")
    chain_id = source.chain_id() or _new_chain_id()
    _claim_chain(conn, chain_id, moved.replica)
    for batch in _batches(source.rows()):
        with conn.cursor() as cursor:
            cursor.executemany(AUDIT_INSERT, [(chain_id, *row) for row in batch])
        moved.records += len(batch)
    receipts = [(chain_id, seq, stored, text) for seq, stored, text in source.receipts()]
    with conn.cursor() as cursor:
        cursor.executemany(
            "INSERT INTO audit_anchors (chain_id, seq, head, receipt) VALUES (%s, %s, %s, %s)",
            receipts,
        )
    moved.receipts, moved.chain_id, moved.head = len(receipts), chain_id, head(source)
    row = conn.execute(_HEAD, (chain_id,)).fetchone()
    copied = (int(row[0]), str(row[1])) if row else head(source)
    if copied != moved.head:
        raise ValueError(f"the copied chain's head {copied} is not the trail's {moved.head}")


def _claim_chain(conn: Any, chain_id: str, replica: str) -> None:
    """Give ``chain_id`` to ``replica``; refused if either is already in the database."""
    import time

    taken = conn.execute(
        "SELECT replica, chain_id FROM audit_chains WHERE replica = %s OR chain_id = %s",
        (replica, chain_id),
    ).fetchone()
    if taken is not None:
        raise ValueError(
            f"the database already holds replica {taken[0]!r} with chain {taken[1]}: the trail "
            "was moved before, or pick another --replica; nothing was moved"
        )
    conn.execute(
        "INSERT INTO audit_chains (replica, chain_id, created_at) VALUES (%s, %s, %s)",
        (replica, chain_id, time.time()),
    )


def _batches(rows: Iterator[tuple[Any, ...]]) -> Iterator[list[tuple[Any, ...]]]:
    batch: list[tuple[Any, ...]] = []
    for row in rows:
        batch.append(row)
        if len(batch) == _BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def _new_chain_id() -> str:
    """A chain id for a trail from before anchoring (as ``audit_receipts.prepare`` makes one)."""
    import secrets

    return secrets.token_hex(16)


@contextmanager
def _read_only(path: Path) -> Iterator[sqlite3.Connection]:
    with closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as db:
        yield db


def _has_table(db: sqlite3.Connection, name: str) -> bool:
    query = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?"
    return db.execute(query, (name,)).fetchone() is not None
