"""Tests of the SQLite API key store: real files, real hashes, real threads."""

from __future__ import annotations

import hashlib
import re
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

from public_api.keys import ApiKey, KeyStore, SqliteKeyStore, hash_token, parse_key_id
from shared.errors import Unauthenticated

TOKEN = re.compile(r"sv_(k_[0-9a-f]{8})_[A-Za-z0-9_-]{43}")


class Clock:
    """A settable clock, so cache expiry is tested without sleeping."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def _tweak(secret: str) -> str:
    """The same token with its last character changed."""
    return secret[:-1] + ("A" if secret[-1] != "A" else "B")


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "public" / "state" / "keys.sqlite3"


@pytest.fixture
def store(db_path: Path, clock: Clock) -> Iterator[SqliteKeyStore]:
    with_store = SqliteKeyStore(db_path, clock=clock)
    yield with_store
    with_store.close()


def test_create_returns_a_well_formed_secret_that_authenticates(store: SqliteKeyStore) -> None:
    key, secret = store.create("alice")
    match = TOKEN.fullmatch(secret)
    assert match is not None and match.group(1) == key.key_id
    assert re.fullmatch(r"k_[0-9a-f]{8}", key.key_id)
    assert key.name == "alice" and key.revoked_at is None
    assert key.created_at == 1_700_000_000.0
    assert store.authenticate(secret) == key
    assert store.get(key.key_id) == key
    assert store.get("k_00000000") is None


def test_the_store_satisfies_the_protocol(store: SqliteKeyStore) -> None:
    typed: KeyStore = store
    key, secret = typed.create("proto")
    assert typed.authenticate(secret).key_id == key.key_id


def test_wrong_secret_for_a_real_key_id_is_refused(store: SqliteKeyStore) -> None:
    key, secret = store.create("alice")
    other_key, other_secret = store.create("bob")
    for token in (_tweak(secret), f"sv_{key.key_id}_{other_secret[-43:]}"):
        with pytest.raises(Unauthenticated) as caught:
            store.authenticate(token)
        assert caught.value.message == "missing or invalid API key"
    assert store.authenticate(other_secret) == other_key


@pytest.mark.parametrize(
    "token",
    [
        "",
        "Bearer",
        "not-a-key",
        "sv_k_12345678_short",
        "sv_k_1234567_" + "a" * 43,
        "sv_k_1234567z_" + "a" * 43,
        "sv_k_12345678_" + "a" * 44,
        "sv_k_12345678_" + "a" * 42 + "=",
        " sv_k_12345678_" + "a" * 43,
    ],
)
def test_malformed_tokens_are_refused(store: SqliteKeyStore, token: str) -> None:
    store.create("alice")
    assert parse_key_id(token) is None
    with pytest.raises(Unauthenticated, match="missing or invalid API key"):
        store.authenticate(token)


def test_unknown_but_well_formed_key_id_is_refused(store: SqliteKeyStore) -> None:
    _, secret = store.create("alice")
    unknown = "sv_k_00000000_" + secret[-43:]
    assert parse_key_id(unknown) == "k_00000000"
    with pytest.raises(Unauthenticated, match="missing or invalid API key"):
        store.authenticate(unknown)


def test_revoked_key_is_refused_with_a_clear_message(store: SqliteKeyStore, clock: Clock) -> None:
    key, secret = store.create("alice")
    assert store.authenticate(secret) == key
    clock.now += 1.0
    revoked = store.revoke("alice")
    assert revoked.key_id == key.key_id and revoked.revoked_at == clock.now
    with pytest.raises(Unauthenticated) as caught:
        store.authenticate(secret)
    assert caught.value.message == f"API key {key.key_id} was revoked"
    clock.now += 5.0
    assert store.revoke(key.key_id).revoked_at == revoked.revoked_at
    with pytest.raises(KeyError):
        store.revoke("nobody")


def test_revocation_by_another_process_applies_at_once(
    store: SqliteKeyStore, db_path: Path
) -> None:
    key, secret = store.create("alice")
    assert store.authenticate(secret) == key
    other = SqliteKeyStore(db_path)
    try:
        other.revoke(key.key_id)
    finally:
        other.close()
    with pytest.raises(Unauthenticated, match="was revoked"):
        store.authenticate(secret)  # the store caches nothing: the gate's KeyCache does


def test_list_returns_every_key_oldest_first(store: SqliteKeyStore, clock: Clock) -> None:
    names = ["carol", "alice", "bob"]
    for name in names:
        store.create(name)
        clock.now += 1.0
    store.revoke("alice")
    listed = store.list()
    assert [key.name for key in listed] == names
    assert [key.revoked for key in listed] == [False, True, False]


def test_limit_overrides_are_stored_and_survive_reopening(
    store: SqliteKeyStore, db_path: Path
) -> None:
    limited, _ = store.create("limited", rate_per_s=2.5, burst=10, daily_quota=1000)
    default, _ = store.create("default")
    assert (limited.rate_per_s, limited.burst, limited.daily_quota) == (2.5, 10, 1000)
    reopened = SqliteKeyStore(db_path)
    try:
        assert reopened.get(limited.key_id) == limited
        assert reopened.get(default.key_id) == ApiKey(default.key_id, "default", default.created_at)
    finally:
        reopened.close()


@pytest.mark.parametrize(
    ("name", "limits", "problem"),
    [
        ("", {}, "non-empty name"),
        ("x", {"rate_per_s": 0.0}, "rate must be positive"),
        ("x", {"rate_per_s": -1.0}, "rate must be positive"),
        ("x", {"burst": 0}, "burst must be at least 1"),
        ("x", {"daily_quota": -5}, "quota must not be negative"),
    ],
)
def test_invalid_names_and_limits_are_refused(
    store: SqliteKeyStore, name: str, limits: dict[str, float], problem: str
) -> None:
    with pytest.raises(ValueError, match=problem):
        store.create(name, **limits)  # type: ignore[arg-type]
    assert store.list() == []


def test_names_are_unique(store: SqliteKeyStore) -> None:
    store.create("alice")
    with pytest.raises(ValueError, match="already exists"):
        store.create("alice")
    assert len(store.list()) == 1


def test_only_the_hash_of_the_secret_is_stored(db_path: Path) -> None:
    store = SqliteKeyStore(db_path)
    key, secret = store.create("alice")
    with sqlite3.connect(db_path) as raw:
        stored = raw.execute(
            "SELECT secret_sha256 FROM keys WHERE key_id = ?", (key.key_id,)
        ).fetchone()[0]
    assert stored == hashlib.sha256(secret.encode()).hexdigest() == hash_token(secret)
    random_part = secret[-43:].encode()
    files = sorted(db_path.parent.glob("keys.sqlite3*"))
    assert db_path in files
    for path in files:  # the database, its WAL and shared-memory files, while open
        assert random_part not in path.read_bytes()
    store.close()
    for path in db_path.parent.glob("keys.sqlite3*"):
        assert random_part not in path.read_bytes()


def test_database_is_in_wal_mode_with_parent_folders_created(db_path: Path) -> None:
    SqliteKeyStore(db_path).close()
    assert db_path.is_file()
    with sqlite3.connect(db_path) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_acceptances_are_recorded_and_the_latest_version_wins(store: SqliteKeyStore) -> None:
    key, _ = store.create("alice")
    other, _ = store.create("bob")
    assert store.accepted_version(key.key_id) is None
    store.record_acceptance(key.key_id, "2024-01", "a" * 64, "10.0.0.1", at=100.0)
    store.record_acceptance(key.key_id, "2024-06", "b" * 64, "10.0.0.2", at=200.0)
    store.record_acceptance(other.key_id, "2024-01", "a" * 64, "10.0.0.3", at=300.0)
    assert store.accepted_version(key.key_id) == "2024-06"
    assert store.accepted_version(other.key_id) == "2024-01"
    assert store.acceptances(key.key_id) == [
        {
            "key_id": key.key_id,
            "version": "2024-01",
            "terms_sha256": "a" * 64,
            "client_address": "10.0.0.1",
            "accepted_at": 100.0,
        },
        {
            "key_id": key.key_id,
            "version": "2024-06",
            "terms_sha256": "b" * 64,
            "client_address": "10.0.0.2",
            "accepted_at": 200.0,
        },
    ]
    with pytest.raises(KeyError):
        store.record_acceptance("k_00000000", "2024-01", "a" * 64, "10.0.0.1", at=1.0)


def test_concurrent_use_from_many_threads(store: SqliteKeyStore) -> None:
    issued = [store.create(f"user{i}") for i in range(4)]
    failures: list[BaseException] = []

    def work(index: int) -> None:
        try:
            key, secret = issued[index % len(issued)]
            for round_ in range(200):
                assert store.authenticate(secret) == key
                if round_ % 50 == 0:
                    store.create(f"t{index}-{round_}")
                with pytest.raises(Unauthenticated):
                    store.authenticate(_tweak(secret))
        except BaseException as error:  # reported below, not lost in the thread
            failures.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert len(store.list()) == 4 + 8 * 4


def test_monitor_decisions_only_rise_until_cleared(store: SqliteKeyStore, db_path: Path) -> None:
    key, _ = store.create("suspect")
    assert store.monitor_decision(key.key_id) is None
    store.record_monitor_decision(key.key_id, "throttled", 1.0)
    assert store.monitor_decision(key.key_id) == "throttled"
    store.record_monitor_decision(key.key_id, "blocked", 2.0)
    store.record_monitor_decision(key.key_id, "throttled", 3.0)  # milder: changes nothing
    assert store.monitor_decision(key.key_id) == "blocked"
    other = SqliteKeyStore(db_path)  # another replica's connection sees it at once
    try:
        assert other.monitor_decision(key.key_id) == "blocked"
        other.clear_monitor_decision(key.key_id)
    finally:
        other.close()
    assert store.monitor_decision(key.key_id) is None
    with pytest.raises(KeyError):
        store.record_monitor_decision("k_00000000", "blocked", 1.0)
    with pytest.raises(ValueError, match="not a monitor decision"):
        store.record_monitor_decision(key.key_id, "ok", 1.0)


def test_a_key_store_from_before_monitor_decisions_gains_the_table(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    with closing(sqlite3.connect(db_path)) as db, db:  # the schema as it was, one key in it
        db.execute(
            "CREATE TABLE keys (key_id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, "
            "secret_sha256 TEXT NOT NULL, created_at REAL NOT NULL, revoked_at REAL, "
            "rate_per_s REAL, burst INTEGER, daily_quota INTEGER)"
        )
        db.execute(
            "INSERT INTO keys VALUES ('k_0000000a', 'old', 'x', 1.0, NULL, NULL, NULL, NULL)"
        )
    opened = SqliteKeyStore(db_path)
    try:
        assert [key.name for key in opened.list()] == ["old"]
        opened.record_monitor_decision("k_0000000a", "blocked", 1.0)
        assert opened.monitor_decision("k_0000000a") == "blocked"
    finally:
        opened.close()
