"""Key groups in the assessment log file (``monitor.sqlite3``): the latest pass's groups for
``splitvault monitor show --groups``, and the operator's pending block/throttle/clear orders.

Tables of their own beside the per-key assessments; the serving tier writes the groups after
each pass and takes the orders at the start of the next.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from public_api.monitor.store import Level
from shared.logs import get_logger
from shared.state_files import private_file

__all__ = ["GroupLog", "GroupRecord", "Order", "read_groups"]

log = get_logger(__name__)
Action = Literal["block", "throttle", "clear"]
ACTIONS: tuple[Action, ...] = ("block", "throttle", "clear")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS key_groups (
    group_id TEXT PRIMARY KEY, members TEXT NOT NULL, links TEXT NOT NULL, score REAL NOT NULL,
    level TEXT NOT NULL, reasons TEXT NOT NULL, queries INTEGER NOT NULL, updated_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS monitor_orders (
    id INTEGER PRIMARY KEY, action TEXT NOT NULL, target TEXT NOT NULL, members TEXT NOT NULL,
    requested_at REAL NOT NULL);
"""


@dataclass(frozen=True)
class GroupRecord:
    """One group as the last pass saw it."""

    group_id: str
    members: tuple[str, ...]
    links: tuple[str, ...]  # Link.describe() of each link
    score: float
    level: Level
    reasons: tuple[str, ...]
    queries: int
    updated_at: float


@dataclass(frozen=True)
class Order:
    """An operator's order: ``action`` on ``members`` (a group's, or one key)."""

    action: Action
    target: str
    members: tuple[str, ...]


@contextmanager
def _connect(path: Path) -> Iterator[sqlite3.Connection]:
    with closing(sqlite3.connect(path, timeout=5.0)) as connection, connection:
        yield connection


class GroupLog:
    """The group tables of ``path`` (the monitor's SQLite file, WAL)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        private_file(self.path)
        with _connect(self.path) as connection:
            connection.execute("PRAGMA journal_mode=WAL")
            connection.executescript(_SCHEMA)

    async def save(self, groups: Sequence[GroupRecord]) -> None:
        """Replace the stored groups with ``groups``; a failed write is logged, not raised."""
        try:
            await asyncio.to_thread(self._save, groups)
        except sqlite3.Error as error:
            log.error("monitor_group_log_write_failed", reason=str(error))

    def _save(self, groups: Sequence[GroupRecord]) -> None:
        with _connect(self.path) as connection:
            connection.execute("DELETE FROM key_groups")
            connection.executemany(
                "INSERT INTO key_groups VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        g.group_id,
                        json.dumps(list(g.members)),
                        json.dumps(list(g.links)),
                        g.score,
                        g.level,
                        json.dumps(list(g.reasons)),
                        g.queries,
                        g.updated_at,
                    )
                    for g in groups
                ],
            )

    def order(self, action: Action, target: str, members: Sequence[str]) -> None:
        """Leave an order for the serving tier (the CLI)."""
        with _connect(self.path) as connection:
            connection.execute(
                "INSERT INTO monitor_orders (action, target, members, requested_at) "
                "VALUES (?, ?, ?, ?)",
                (action, target, json.dumps(list(members)), time.time()),
            )

    async def take_orders(self) -> list[Order]:
        """Pending orders, oldest first, removed as they are returned (none while the file
        cannot be read: they wait for the next pass)."""
        try:
            return await asyncio.to_thread(self._take_orders)
        except sqlite3.Error as error:
            log.error("monitor_group_log_read_failed", reason=str(error))
            return []

    def _take_orders(self) -> list[Order]:
        with _connect(self.path) as connection:
            rows = connection.execute(
                "SELECT id, action, target, members FROM monitor_orders ORDER BY id"
            ).fetchall()
            connection.executemany(
                "DELETE FROM monitor_orders WHERE id = ?", [(row[0],) for row in rows]
            )
        return [
            Order(action, str(target), tuple(json.loads(members)))
            for _, action, target, members in rows
            if action in ACTIONS
        ]


def read_groups(path: Path) -> list[GroupRecord]:
    """The groups of the last pass, highest score first (none if the file has none)."""
    if not Path(path).is_file():
        return []
    with _connect(Path(path)) as connection:
        exists = connection.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'key_groups'"
        ).fetchone()
        if exists is None:
            return []
        rows = connection.execute(
            "SELECT group_id, members, links, score, level, reasons, queries, updated_at "
            "FROM key_groups ORDER BY score DESC, group_id"
        ).fetchall()
    return [
        GroupRecord(
            str(gid),
            tuple(json.loads(members)),
            tuple(json.loads(links)),
            float(score),
            level,
            tuple(json.loads(reasons)),
            int(queries),
            float(at),
        )
        for gid, members, links, score, level, reasons, queries, at in rows
    ]
