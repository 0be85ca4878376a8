"""``splitvault state migrate --from sqlite`` into a real PostgreSQL, then replicas on it.

One host's public tier serves on SQLite and anchors its trail in the private tier's ledger; it is
stopped and its state moved. The keys, their terms acceptances and a monitor block hold on the
replicas that start on PostgreSQL; the ledger's anchors of the old chain cover the moved records
unchanged, and the replica continuing the chain anchors forward under the same chain id. A second
replica's chain, with records not anchored yet, is reported "not covered" (not "trail
replaced"). ``splitvault evidence`` reads the key and every chain from PostgreSQL.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from public_api.keys import KEYS_DB, STATE_DIR, SqliteKeyStore
from shared.layout import DeployLayout
from tests.conftest import Deployment, DigitsFixture, issue_key
from tests.support.deployments import copy_deployment
from tests.support.postgres_server import PostgresServer, postgres_server_fixture
from tests.support.processes import TierProcess, start_private, start_public
from tests.support.stack import cli, https, image_request, poll, tier_env

pytestmark = pytest.mark.slow

INFER = "/v2/models/digits/infer"
SERVED_ON_SQLITE = 10
ANCHOR_OFTEN = {"audit_anchor__every_records": 4, "audit_anchor__every_s": 0.5}
ANCHOR_RARELY = {
    "audit_anchor__every_records": 10_000,
    "audit_anchor__every_s": 3600,
    "audit_anchor__max_unanchored_s": 86_400,
}

postgres_server = postgres_server_fixture(scope="module")


@dataclass
class Migrated:
    """The deployment copy, its private tier, the DSN file and the keys' secrets."""

    layout: DeployLayout
    private: TierProcess
    dsn_file: Path
    keys: dict[str, str]
    images: Any
    first_migrate: str = ""
    publics: list[TierProcess] = field(default_factory=list)

    def cli(self, *args: str) -> tuple[int, str]:
        result = cli(*args, "--dsn-file", str(self.dsn_file), deploy=self.layout.root)
        return result.returncode, result.stdout + result.stderr

    def start_public(self, replica: str, **protection: Any) -> TierProcess:
        env = tier_env(**protection) | {
            "SPLITVAULT_PUBLIC_STATE_BACKEND": "postgres",
            "SPLITVAULT_PUBLIC_POSTGRES_DSN_FILE": str(self.dsn_file),
            "SPLITVAULT_PUBLIC_REPLICA_NAME": replica,
        }
        public = start_public(self.layout.root, self.private.port, env=env)
        self.publics.append(public)
        return public

    def infer(self, public: TierProcess, key: str) -> httpx.Response:
        with https(self.layout, public.port, self.keys[key]) as http:
            return http.post(INFER, json=image_request(self.images[:1]))

    def export_anchors(self, out: Path) -> Path:
        result = cli("ledger", "export-anchors", "--out", str(out), deploy=self.layout.root)
        assert result.returncode == 0, result.stderr
        return out


def _anchored(public: TierProcess, seq: int) -> None:
    poll(
        lambda: any(
            e.get("event") == "audit_anchored" and e.get("seq") == seq for e in public.events()
        ),
        f"an anchor of record {seq}",
    )


@pytest.fixture(scope="module")
def migrated(
    deployment: Deployment,
    digits_model: DigitsFixture,
    postgres_server: PostgresServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Migrated]:
    """A SQLite public tier served and anchored 10 records, then was stopped and migrated."""
    root = tmp_path_factory.mktemp("state-migrate") / "d"
    layout = copy_deployment(deployment.layout, root, keep_public_state=False)
    keys = {name: issue_key(layout, name) for name in ("alice", "mallory")}
    with closing(SqliteKeyStore(layout.public.root / STATE_DIR / KEYS_DB)) as store:
        mallory = next(k for k in store.list() if k.name == "mallory")
        store.record_monitor_decision(mallory.key_id, "blocked", 1.0)
    dsn_file = root.parent / "postgres.dsn"
    dsn_file.write_text(postgres_server.create_database("migrated") + "\n")
    private = start_private(root, env=tier_env())
    state = Migrated(layout, private, dsn_file, keys, digits_model.data.test_x)
    try:
        sqlite_public = start_public(root, private.port, env=tier_env(**ANCHOR_OFTEN))
        state.publics.append(sqlite_public)
        for _ in range(SERVED_ON_SQLITE):
            assert state.infer(sqlite_public, "alice").status_code == 200
        _anchored(sqlite_public, SERVED_ON_SQLITE)
        sqlite_public.stop()  # stop the public tier before moving its state
        code, state.first_migrate = state.cli(
            "state", "migrate", "--from", "sqlite", "--replica", "public-0"
        )
        assert code == 0, state.first_migrate
        yield state
    finally:
        for public in state.publics:
            public.stop()
        private.stop()


def test_migrate_moves_keys_acceptances_decisions_and_the_chain(migrated: Migrated) -> None:
    out = migrated.first_migrate
    assert "moved 2 API keys, 2 terms acceptances, 1 monitor decisions" in out
    assert f"{SERVED_ON_SQLITE} records" in out and "replica 'public-0' continues" in out
    code, again = migrated.cli("state", "migrate", "--from", "sqlite", "--replica", "public-0")
    assert code != 0 and "nothing was moved" in again, again


def test_old_anchors_cover_the_moved_chain_and_the_replica_anchors_forward(
    migrated: Migrated, tmp_path: Path
) -> None:
    before = migrated.export_anchors(tmp_path / "before.json")
    code, out = migrated.cli("audit", "verify", "--anchors", str(before))
    assert code == 0, out
    assert f"records 1..{SERVED_ON_SQLITE} covered by an anchor of the private ledger" in out
    continuing = migrated.start_public("public-0", **ANCHOR_OFTEN)
    assert migrated.infer(continuing, "alice").status_code == 200  # key and terms moved
    _anchored(continuing, SERVED_ON_SQLITE + 1)  # record n + 1 of the same chain
    after = migrated.export_anchors(tmp_path / "after.json")
    code, out = migrated.cli("audit", "verify", "--anchors", str(after))
    assert code == 0, out
    assert f"records 1..{SERVED_ON_SQLITE + 1} covered by an anchor" in out
    assert "1 chains checked, 0 failed" in out
    assert migrated.infer(continuing, "mallory").status_code == 403  # the block moved


def test_a_replica_chain_not_anchored_yet_is_not_covered_not_replaced(
    migrated: Migrated, tmp_path: Path
) -> None:
    fresh = migrated.start_public("public-1", **ANCHOR_RARELY)
    for _ in range(2):
        assert migrated.infer(fresh, "alice").status_code == 200
    anchors = migrated.export_anchors(tmp_path / "anchors.json")
    poll(lambda: _chain_records(migrated, "public-1") == 2, "public-1's records committed")
    code, out = migrated.cli("audit", "verify", "--anchors", str(anchors))
    assert code == 0, out
    assert "replaced" not in out
    assert "(replica public-1) OK: 2 records" in out
    assert "records 1..2 NOT covered" in out


def test_evidence_reads_the_key_and_every_chain_from_postgres(
    migrated: Migrated, tmp_path: Path
) -> None:
    anchors = migrated.export_anchors(tmp_path / "anchors.json")
    code, out = migrated.cli(
        "evidence", "--model", "digits", "--key", "alice", "--anchors", str(anchors),
        "--out", str(tmp_path / "report"),
    )  # fmt: skip
    assert code == 0, out
    evidence = json.loads((tmp_path / "report" / "evidence.json").read_text())
    assert evidence["api_key"]["key"]["name"] == "alice"
    assert len(evidence["api_key"]["terms_acceptances"]) == 1
    audit = evidence["audit"]
    assert audit["status"] == "OK", audit["problem"]
    moved = [r for r in audit["records"] if r["chain_id"] == audit["chains"][0]["chain_id"]]
    assert len(moved) >= SERVED_ON_SQLITE
    assert all(r["anchored"] for r in moved[:SERVED_ON_SQLITE])


def _chain_records(migrated: Migrated, replica: str) -> int:
    import psycopg

    with psycopg.connect(migrated.dsn_file.read_text().strip()) as conn:
        row = conn.execute(
            "SELECT count(*) FROM audit JOIN audit_chains USING (chain_id) WHERE replica = %s",
            (replica,),
        ).fetchone()
    return int(row[0]) if row else 0
