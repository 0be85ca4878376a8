"""The red team's audit rewrite: edit a trail with sqlite3 directly, then recompute its chain."""

from __future__ import annotations

import sqlite3
from dataclasses import fields
from pathlib import Path

from public_api.audit import GENESIS_HASH, AuditRecord, record_hash

# Column names from the record type itself (constants, not input).
_FIELDS = [field.name for field in fields(AuditRecord)]
_SELECT = f"SELECT {', '.join(_FIELDS)} FROM audit ORDER BY seq"  # noqa: S608
_INSERT = (
    f"INSERT INTO audit (seq, {', '.join(_FIELDS)}, prev_hash, hash) "  # noqa: S608
    f"VALUES (?, {', '.join('?' * len(_FIELDS))}, ?, ?)"
)


def rewrite_trail(path: Path, statements: list[str]) -> int:
    """Run ``statements`` on the trail at ``path``, then renumber every record from 1 and
    recompute every hash with the trail's own ``record_hash``; returns the records left."""
    with sqlite3.connect(path) as db:
        for statement in statements:
            db.execute(statement)
        rows = db.execute(_SELECT).fetchall()
        db.execute("DELETE FROM audit")
        prev = GENESIS_HASH
        for seq, values in enumerate(rows, start=1):
            digest = record_hash(seq, dict(zip(_FIELDS, values, strict=True)), prev)
            db.execute(_INSERT, (seq, *values, prev, digest))
            prev = digest
    return len(rows)
