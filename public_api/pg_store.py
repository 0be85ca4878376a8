"""The public replicas' shared PostgreSQL database: connection pool, versioned migrations, errors.

``state_backend = "postgres"`` puts API keys, terms acceptances, the monitor's lasting decisions
and the audit trail (one chain per replica) in one database, so every replica sees a key created,
revoked or blocked on another. The schema is versioned (``splitvault_migrations``); ``migrate``
applies what is missing under a PostgreSQL advisory lock, so replicas starting together apply
each version once. A database of a newer version than this code knows is refused.

PostgreSQL is public-side state, writable by whoever owns a public host: nothing the private tier
decides (its budgets, signer registrations, audit anchors) comes from it.

Reads and writes on the request path go through ``unavailable_on_error``: a database that cannot
be reached answers 503 + Retry-After within the pool's ``timeout_s``, never a hang or a 500.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
from psycopg_pool import ConnectionPool

from shared.errors import Unavailable
from shared.logs import get_logger

log = get_logger(__name__)

# pg_advisory_lock key of the migrations: "splitvault" folded into a bigint.
MIGRATION_LOCK = 0x5350_4C49_5456_4C54
_V1 = """
CREATE TABLE keys (
    key_id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    secret_sha256 TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    revoked_at DOUBLE PRECISION,
    rate_per_s DOUBLE PRECISION,
    burst INTEGER,
    daily_quota BIGINT
);
CREATE TABLE terms_acceptances (
    id BIGSERIAL PRIMARY KEY,
    key_id TEXT NOT NULL REFERENCES keys (key_id),
    version TEXT NOT NULL,
    terms_sha256 TEXT NOT NULL,
    client_address TEXT NOT NULL,
    accepted_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX terms_acceptances_by_key ON terms_acceptances (key_id, accepted_at);
CREATE TABLE monitor_decisions (
    key_id TEXT PRIMARY KEY REFERENCES keys (key_id),
    level TEXT NOT NULL CHECK (level IN ('throttled', 'blocked')),
    decided_at DOUBLE PRECISION NOT NULL
);
CREATE TABLE audit_chains (
    replica TEXT PRIMARY KEY,
    chain_id TEXT NOT NULL UNIQUE,
    created_at DOUBLE PRECISION NOT NULL
);
CREATE TABLE audit (
    chain_id TEXT NOT NULL REFERENCES audit_chains (chain_id),
    seq BIGINT NOT NULL,
    time DOUBLE PRECISION NOT NULL,
    key_id TEXT,
    client TEXT NOT NULL,
    model TEXT,
    input_sha256 TEXT,
    answer TEXT,
    decision TEXT NOT NULL,
    status INTEGER NOT NULL,
    monitor_score DOUBLE PRECISION,
    request_id TEXT,
    count INTEGER NOT NULL DEFAULT 1,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL,
    PRIMARY KEY (chain_id, seq)
);
CREATE INDEX audit_by_key ON audit (key_id, chain_id, seq);
CREATE INDEX audit_by_request ON audit (request_id);
CREATE TABLE audit_anchors (
    chain_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    head TEXT NOT NULL,
    receipt TEXT NOT NULL,
    PRIMARY KEY (chain_id, seq)
);
"""
# Append only: version n is MIGRATIONS[n - 1]; an applied version is never edited.
MIGRATIONS: tuple[str, ...] = (_V1,)


def read_dsn(path: Path) -> str:
    """The DSN in the secret file ``path`` (one line; ``ValueError`` if empty)."""
    dsn = path.read_text(encoding="utf-8").strip()
    if not dsn:
        raise ValueError(f"the PostgreSQL DSN file {path} is empty")
    return dsn


def open_pool(dsn: str, *, max_size: int = 8, timeout_s: float = 2.0) -> ConnectionPool:
    """A started pool on ``dsn`` whose schema is migrated; waits at most 10 s for PostgreSQL.

    ``timeout_s`` bounds both a new connection and the wait for a free one, so an outage
    answers 503 within it.
    """
    migrate(dsn)
    pool = ConnectionPool(
        dsn,
        min_size=1,
        max_size=max_size,
        timeout=timeout_s,
        kwargs={"connect_timeout": max(1, round(timeout_s))},
        reconnect_timeout=3600.0,
        name="splitvault-state",
        open=False,
    )
    pool.open(wait=True, timeout=10.0)
    return pool


def migrate(dsn: str) -> int:
    """Apply every missing migration under the advisory lock; returns the schema version."""
    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK,))
        try:
            return _apply(conn)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK,))


def _apply(conn: psycopg.Connection[tuple[object, ...]]) -> int:
    conn.execute(
        "CREATE TABLE IF NOT EXISTS splitvault_migrations "
        "(version INTEGER PRIMARY KEY, applied_at DOUBLE PRECISION NOT NULL)"
    )
    rows = conn.execute("SELECT version FROM splitvault_migrations").fetchall()
    done = {int(str(row[0])) for row in rows}
    if done and max(done) > len(MIGRATIONS):
        raise RuntimeError(
            f"the state database is at schema version {max(done)}, newer than this splitvault "
            f"knows ({len(MIGRATIONS)}): upgrade splitvault"
        )
    for version, script in enumerate(MIGRATIONS, start=1):
        if version in done:
            continue
        with conn.transaction():
            conn.execute(script.encode())  # several statements, no parameters
            conn.execute(
                "INSERT INTO splitvault_migrations (version, applied_at) VALUES (%s, %s)",
                (version, time.time()),
            )
        log.info("state_migrated", version=version)
    return len(MIGRATIONS)


@contextmanager
def unavailable_on_error(what: str) -> Iterator[None]:
    """A database that cannot be reached or answer now becomes 503 + Retry-After; the cause is
    logged, not sent to the client."""
    try:
        yield
    except psycopg.OperationalError as error:  # includes the pool's timeout
        log.error("state_store_unavailable", store=what, reason=str(error).strip())
        raise Unavailable(
            f"the {what} cannot be read now; retry later", retry_after_s=1.0
        ) from error
