"""The public tier's lasting state, by ``state_backend``: SQLite files or shared PostgreSQL.

``open_state`` opens the key store (with terms acceptances and monitor decisions), the audit
trail and the store of its anchor receipts: in ``state_dir`` for ``"sqlite"``, in the database
every replica shares for ``"postgres"`` (``public_api.pg_store``). Either way they are public-side
state: nothing the private tier decides comes from them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypedDict

from psycopg_pool import ConnectionPool

from public_api.audit import AUDIT_DB
from public_api.audit_receipts import ReceiptStore, SqliteReceipts
from public_api.audit_writer import AuditTrail, FailurePolicy
from public_api.keys import KEYS_DB, KeyStore, SqliteKeyStore
from public_api.pg_audit import PgReceipts, open_pg_trail
from public_api.pg_keys import PgKeyStore
from public_api.pg_store import open_pool, read_dsn
from public_api.settings import PublicSettings
from shared.logs import get_logger
from shared.state_files import private_dir

log = get_logger(__name__)


@dataclass
class StateStores:
    """The stores ``build_protection`` uses; ``close`` after the trail and its anchorer."""

    keys: KeyStore | None
    audit: AuditTrail | None
    receipts: ReceiptStore
    pool: ConnectionPool | None = None

    def close(self) -> None:
        """Close the key store and the database pool (the trail is closed by its owner)."""
        if self.keys is not None:
            self.keys.close()
        if self.pool is not None:
            self.pool.close()


def open_state(settings: PublicSettings) -> StateStores:
    """The stores of ``settings.state_backend``; the PostgreSQL schema is migrated first."""
    config = settings.protection
    private_dir(settings.state_dir)  # monitor and group logs stay per replica, in SQLite
    if settings.state_backend == "sqlite":
        path = settings.state_dir / AUDIT_DB
        return StateStores(
            SqliteKeyStore(settings.state_dir / KEYS_DB) if config.require_api_key else None,
            AuditTrail.open(path, **_trail_options(settings)) if config.audit_enabled else None,
            SqliteReceipts(path),
        )
    assert settings.postgres_dsn_file is not None  # the settings' validator
    pool = open_pool(read_dsn(settings.postgres_dsn_file), timeout_s=settings.postgres_timeout_s)
    try:
        trail = None
        if config.audit_enabled:
            trail = open_pg_trail(pool, settings.replica_name, **_trail_options(settings))
    except BaseException:
        pool.close()
        raise
    log.info("state_backend_ready", backend="postgres", replica=settings.replica_name)
    keys = PgKeyStore(pool) if config.require_api_key else None
    return StateStores(keys, trail, PgReceipts(pool), pool)


class _TrailOptions(TypedDict):
    on_failure: FailurePolicy
    buffer_max: int
    aggregate_s: float


def _trail_options(settings: PublicSettings) -> _TrailOptions:
    config = settings.protection
    return _TrailOptions(
        on_failure=config.audit_on_failure,
        buffer_max=config.audit_buffer_max,
        aggregate_s=config.audit_aggregate_s,
    )
