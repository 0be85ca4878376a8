"""A stored audit trail, as verification and export read it: one SQLite file, or one replica's
chain in the shared PostgreSQL database (``public_api.pg_audit``).

``audit.verify_chain``, ``audit.export_records`` and ``audit_coverage.check_coverage`` take a
``TrailSource`` (or a SQLite file's path), so ``splitvault audit verify`` and ``evidence`` check
the same things whichever backend holds the trail.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any, Protocol

GENESIS_HASH = "0" * 64
_SELECT_ALL = (
    "SELECT seq, time, key_id, client, model, input_sha256, answer, decision, status, "
    "monitor_score, request_id, count, prev_hash, hash FROM audit ORDER BY seq"
)
_SELECT_KEY = (
    "SELECT seq, time, key_id, client, model, input_sha256, answer, decision, status, "
    "monitor_score, request_id, count, prev_hash, hash FROM audit WHERE key_id = ? ORDER BY seq"
)


class TrailSource(Protocol):
    """Read access to one chain: rows are ``(seq, *AuditRecord fields, prev_hash, hash)``."""

    @property
    def name(self) -> str:
        """What messages call the trail (a path, or a database and chain)."""
        ...

    def count(self) -> int:
        """How many records the chain holds."""
        ...

    def rows(self) -> Iterator[tuple[Any, ...]]:
        """Every record, in seq order."""
        ...

    def key_rows(self, key_id: str) -> Iterator[tuple[Any, ...]]:
        """The records of ``key_id``, in seq order."""
        ...

    def head(self) -> tuple[int, str]:
        """The last record's seq and hash (``(0, GENESIS_HASH)``: none)."""
        ...

    def hashes(self, seqs: Iterable[int]) -> dict[int, str]:
        """The stored hash of each record in ``seqs`` that the chain has."""
        ...

    def chain_id(self) -> str | None:
        """The chain's id (``None``: a trail from before anchoring)."""
        ...

    def receipts(self) -> Iterator[tuple[int, str, str]]:
        """(seq, stored head, receipt JSON) of each anchor receipt kept with the chain."""
        ...


class SqliteTrailSource:
    """``TrailSource`` of a SQLite trail file, read only (it is never created here)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    def name(self) -> str:
        return str(self.path)

    def count(self) -> int:
        with closing(self._open()) as db:
            return int(db.execute("SELECT count(*) FROM audit").fetchone()[0])

    def rows(self) -> Iterator[tuple[Any, ...]]:
        with closing(self._open()) as db:
            yield from db.execute(_select(db, _SELECT_ALL))

    def key_rows(self, key_id: str) -> Iterator[tuple[Any, ...]]:
        with closing(self._open()) as db:
            yield from db.execute(_select(db, _SELECT_KEY), (key_id,))

    def head(self) -> tuple[int, str]:
        with closing(self._open()) as db:
            return sqlite_head(db)

    def hashes(self, seqs: Iterable[int]) -> dict[int, str]:
        found = {}
        with closing(self._open()) as db:
            for seq in sorted(seqs):
                row = db.execute("SELECT hash FROM audit WHERE seq = ?", (seq,)).fetchone()
                if row is not None:
                    found[seq] = str(row[0])
        return found

    def chain_id(self) -> str | None:
        with closing(self._open()) as db:
            if not _has_table(db, "audit_meta"):
                return None
            row = db.execute("SELECT value FROM audit_meta WHERE name = 'chain_id'").fetchone()
            return None if row is None else str(row[0])

    def receipts(self) -> Iterator[tuple[int, str, str]]:
        with closing(self._open()) as db:
            if not _has_table(db, "audit_anchors"):
                return
            query = "SELECT seq, head, receipt FROM audit_anchors ORDER BY seq"
            for seq, head, text in db.execute(query).fetchall():
                yield int(seq), str(head), str(text)

    def _open(self) -> sqlite3.Connection:
        """A read-only connection; ``FileNotFoundError`` instead of creating a missing file."""
        if not self.path.is_file():
            raise FileNotFoundError(f"no audit trail at {self.path}")
        return sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True)


def as_source(trail: Path | TrailSource) -> TrailSource:
    """``trail`` as a ``TrailSource`` (a path is a SQLite file)."""
    return SqliteTrailSource(trail) if isinstance(trail, Path) else trail


def sqlite_head(db: sqlite3.Connection) -> tuple[int, str]:
    """The last record's seq and hash in a SQLite trail (``(0, GENESIS_HASH)``: none)."""
    row = db.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
    return (int(row[0]), str(row[1])) if row else (0, GENESIS_HASH)


def _select(db: sqlite3.Connection, query: str) -> str:
    """``query`` for this file: a trail from before ``count`` reads 1 in its place."""
    columns = {row[1] for row in db.execute("PRAGMA table_info(audit)")}
    return query if "count" in columns or not columns else query.replace(", count,", ", 1,")


def _has_table(db: sqlite3.Connection, name: str) -> bool:
    query = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?"
    return db.execute(query, (name,)).fetchone() is not None
