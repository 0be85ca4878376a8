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


def read_chain_id(path: Path) -> str | None:
    """The chain id of the trail at ``path`` (``None``: a trail from before anchoring)."""
    with closing(_read_only(path)) as db:
        if not _has_table(db, "audit_meta"):
            return None
        row = db.execute("SELECT value FROM audit_meta WHERE name = 'chain_id'").fetchone()
        return None if row is None else str(row[0])


def read_receipts(path: Path) -> Iterator[tuple[int, str, AnchorReceipt | str]]:
    """(seq, stored head, receipt) per row; a receipt that does not parse comes as why."""
    with closing(_read_only(path)) as db:
        if not _has_table(db, "audit_anchors"):
            return
        for seq, head, text in db.execute(
            "SELECT seq, head, receipt FROM audit_anchors ORDER BY seq"
        ).fetchall():
            try:
                yield int(seq), str(head), AnchorReceipt.from_json(json.loads(text))
            except (ValueError, TypeError) as error:
                yield int(seq), str(head), f"receipt {seq} does not parse: {error}"


def _has_table(db: sqlite3.Connection, name: str) -> bool:
    query = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?"
    return db.execute(query, (name,)).fetchone() is not None


def _read_only(path: Path) -> sqlite3.Connection:
    if not path.is_file():
        raise FileNotFoundError(f"no audit trail at {path}")
    return sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
