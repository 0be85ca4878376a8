"""The audit trail's chain id and the anchor receipts kept beside its records (same database).

``audit_meta`` holds the trail's ``chain_id`` (32 random hex digits, made when the trail is
first opened), the name the private ledger knows the chain by. ``audit_anchors`` holds one
receipt per anchored record (``seq``): the private tier's signed statement of the head there.
Both live on the public host, so neither proves anything alone: ``public_api.audit_coverage``
checks them against the private ledger's own export.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Protocol

from public_api.audit_source import TrailSource, as_source
from shared.anchor_receipt import AnchorReceipt

_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit_meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS audit_anchors (
    seq INTEGER PRIMARY KEY,
    chain_id TEXT NOT NULL,
    head TEXT NOT NULL,
    receipt TEXT NOT NULL
);
"""


def prepare(db: sqlite3.Connection) -> str:
    """Create the tables if missing and give the trail a chain id once; returns the id."""
    db.executescript(_SCHEMA)
    query = "SELECT value FROM audit_meta WHERE name = 'chain_id'"
    row = db.execute(query).fetchone()
    if row is None:  # write only when missing: another process may hold the write lock
        db.execute(
            "INSERT OR IGNORE INTO audit_meta (name, value) VALUES ('chain_id', ?)",
            (secrets.token_hex(16),),
        )
        row = db.execute(query).fetchone()
    return str(row[0])


def store(db: sqlite3.Connection, receipt: AnchorReceipt) -> None:
    """Keep ``receipt`` (a retry of the same anchor replaces it)."""
    db.execute(
        "INSERT OR REPLACE INTO audit_anchors (seq, chain_id, head, receipt) VALUES (?, ?, ?, ?)",
        (receipt.seq, receipt.chain_id, receipt.head, json.dumps(receipt.to_json())),
    )


def last_anchored(db: sqlite3.Connection, chain_id: str) -> int:
    """The highest record of ``chain_id`` with a receipt here (0: none)."""
    row = db.execute(
        "SELECT max(seq) FROM audit_anchors WHERE chain_id = ?", (chain_id,)
    ).fetchone()
    return int(row[0] or 0)


class ReceiptStore(Protocol):
    """Where the anchorer keeps receipts: beside the records of its chain."""

    def last_anchored(self, chain_id: str) -> int:
        """The highest record of ``chain_id`` with a receipt (0: none)."""
        ...

    def store(self, receipt: AnchorReceipt) -> None:
        """Keep ``receipt`` (a retry of the same anchor replaces it)."""
        ...


class SqliteReceipts:
    """``ReceiptStore`` in the SQLite trail file at ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def last_anchored(self, chain_id: str) -> int:
        with closing(self._connect()) as db:
            return last_anchored(db, chain_id)

    def store(self, receipt: AnchorReceipt) -> None:
        with closing(self._connect()) as db, db:
            store(db, receipt)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=5.0)
        db.execute("PRAGMA busy_timeout=5000")
        return db


def read_chain_id(trail: Path | TrailSource) -> str | None:
    """The chain id of the trail (``None``: a trail from before anchoring)."""
    return as_source(trail).chain_id()


def read_receipts(trail: Path | TrailSource) -> Iterator[tuple[int, str, AnchorReceipt | str]]:
    """(seq, stored head, receipt) per row; a receipt that does not parse comes as why."""
    for seq, head, text in as_source(trail).receipts():
        try:
            yield seq, head, AnchorReceipt.from_json(json.loads(text))
        except (ValueError, TypeError) as error:
            yield seq, head, f"receipt {seq} does not parse: {error}"
