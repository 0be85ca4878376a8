"""Operator commands' access to the public tier's state: SQLite files or the shared PostgreSQL.

``splitvault keys`` and ``splitvault audit`` take ``--dsn-file``; without it they use what the
deployment's public tier is configured with (``SPLITVAULT_PUBLIC_STATE_BACKEND`` and
``SPLITVAULT_PUBLIC_POSTGRES_DSN_FILE``, else ``state_backend`` and ``postgres_dsn_file`` in
``public.toml``), so a command acts on the store the running replicas share.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared.layout import DeployLayout

if TYPE_CHECKING:
    import psycopg

    from public_api.keys import KeyStore

ENV_PREFIX = "SPLITVAULT_PUBLIC_"


def configured_dsn(deploy: Path, dsn_file: Path | None) -> str | None:
    """The PostgreSQL DSN of the deployment's public state, or ``None`` when it is SQLite."""
    from public_api.pg_store import read_dsn

    if dsn_file is not None:
        return read_dsn(dsn_file)
    config: dict[str, Any] = {}
    path = DeployLayout(deploy).public_config
    if path.is_file():
        config = tomllib.loads(path.read_text("utf-8"))
    backend = os.environ.get(f"{ENV_PREFIX}STATE_BACKEND") or config.get("state_backend")
    if backend != "postgres":
        return None
    named = os.environ.get(f"{ENV_PREFIX}POSTGRES_DSN_FILE") or config.get("postgres_dsn_file")
    if not named:
        raise ValueError("state_backend is 'postgres' but postgres_dsn_file is unset")
    return read_dsn(Path(str(named)))


def open_key_store(deploy: Path, dsn_file: Path | None) -> KeyStore:
    """The deployment's key store (close it when done)."""
    from public_api.keys import KEYS_DB, SqliteKeyStore
    from public_api.pg_keys import PgKeyStore
    from public_api.pg_store import open_pool
    from public_api.settings import public_state_dir

    dsn = configured_dsn(deploy, dsn_file)
    if dsn is None:
        return SqliteKeyStore(public_state_dir(deploy) / KEYS_DB)
    return PgKeyStore(open_pool(dsn, max_size=1, timeout_s=10.0), owns_pool=True)


@contextmanager
def postgres(dsn: str) -> Iterator[psycopg.Connection[Any]]:
    """A read-only connection to the shared database."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SET default_transaction_read_only = on")
        yield conn
