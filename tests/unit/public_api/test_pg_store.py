"""The PostgreSQL state backend against a real server: migrations, key store, audit chains."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import psycopg
import pytest
from psycopg_pool import ConnectionPool

from public_api.audit import AuditRecord, verify_chain
from public_api.pg_audit import PgTrailSource, chains, open_pg_trail
from public_api.pg_keys import PgKeyStore
from public_api.pg_store import MIGRATIONS, migrate, open_pool
from shared.errors import Unauthenticated
from tests.support.postgres_server import PostgresServer, postgres_server_fixture

postgres_server = postgres_server_fixture(scope="module")


@pytest.fixture
def dsn(postgres_server: PostgresServer, request: pytest.FixtureRequest) -> str:
    return postgres_server.create_database(request.node.name.replace("[", "_").strip("]"))


@pytest.fixture
def pool(dsn: str) -> Iterator[ConnectionPool]:
    pool = open_pool(dsn)
    yield pool
    pool.close()


def test_replicas_migrating_together_apply_each_version_once(dsn: str) -> None:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            migrate(dsn)
        except BaseException as error:  # reported below, in the test's thread
            errors.append(error)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    with psycopg.connect(dsn) as conn:
        versions = conn.execute("SELECT version FROM splitvault_migrations").fetchall()
    assert versions == [(v,) for v in range(1, len(MIGRATIONS) + 1)]


def test_a_database_newer_than_the_code_is_refused(dsn: str) -> None:
    migrate(dsn)
    with psycopg.connect(dsn) as conn:
        conn.execute("INSERT INTO splitvault_migrations VALUES (%s, 0)", (len(MIGRATIONS) + 1,))
    with pytest.raises(RuntimeError, match="newer than this splitvault"):
        migrate(dsn)


def test_key_store_contract(pool: ConnectionPool) -> None:
    store = PgKeyStore(pool)
    key, secret = store.create("alice", daily_quota=5)
    assert store.authenticate(secret) == key
    with pytest.raises(ValueError, match="already exists"):
        store.create("alice")
    with pytest.raises(Unauthenticated):
        store.authenticate(secret[:-1] + ("A" if secret[-1] != "A" else "B"))
    store.record_monitor_decision(key.key_id, "blocked", 1.0)
    store.record_monitor_decision(key.key_id, "throttled", 2.0)  # never lowered
    assert store.monitor_decision(key.key_id) == "blocked"
    with pytest.raises(KeyError):
        store.record_acceptance("k_00000000", "1", "0" * 64, "127.0.0.1", 1.0)
    assert store.revoke("alice").revoked
    with pytest.raises(Unauthenticated, match="revoked"):
        store.authenticate(secret)


def test_each_replica_writes_its_own_chain_that_verifies(dsn: str, pool: ConnectionPool) -> None:
    for replica in ("a", "b", "a"):  # "a" again: a restarted replica chains on
        trail = open_pg_trail(pool, replica)
        for n in range(3):
            trail.append(AuditRecord(float(n), None, "127.0.0.1", "m", None, None, "served", 200))
        trail.close()
    with psycopg.connect(dsn) as conn:
        found = chains(conn)
        assert [replica for replica, _ in found] == ["a", "b"]
        results = {r: verify_chain(PgTrailSource(conn, c, r)) for r, c in found}
    assert {r: (v.ok, v.records) for r, v in results.items()} == {"a": (True, 6), "b": (True, 3)}
