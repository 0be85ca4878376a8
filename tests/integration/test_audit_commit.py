"""Audit records committed before the response (issue 15), real tiers on both state backends.

A public tier killed with SIGKILL as soon as an answer reaches its client leaves that answer's
record in its store, committed; a store that refuses writes (a trigger on the audit table, in
SQLite or PostgreSQL) sends no answer without a record: 503 + Retry-After, no "served" record
for those requests, then serving resumes by itself once the store takes writes again.
"""

from __future__ import annotations

import asyncio
import sqlite3
import ssl
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg
import pytest

from public_api.audit import AUDIT_DB
from public_api.keys import STATE_DIR, parse_key_id
from shared.layout import DeployLayout
from tests.conftest import Deployment, DigitsFixture
from tests.support.deployments import copy_deployment
from tests.support.postgres_server import PostgresServer, postgres_server_fixture
from tests.support.processes import TierProcess, start_private, start_public
from tests.support.stack import cli, image_request, tier_env

pytestmark = pytest.mark.slow

INFER = "/v2/models/digits/infer"
BACKENDS = ("sqlite", "postgres")
SQLITE_FAIL = (
    "CREATE TRIGGER fail_inserts BEFORE INSERT ON audit "
    "BEGIN SELECT RAISE(ABORT, 'storage refuses'); END",
)
POSTGRES_FAIL = (
    "CREATE FUNCTION refuse_insert() RETURNS trigger LANGUAGE plpgsql AS "
    "$$ BEGIN RAISE EXCEPTION 'storage refuses'; END $$",
    "CREATE TRIGGER fail_inserts BEFORE INSERT ON audit "
    "FOR EACH ROW EXECUTE FUNCTION refuse_insert()",
)

postgres_server = postgres_server_fixture(scope="module")


@dataclass
class Store:
    """One backend's public state for a copy of the deployment: where its records are."""

    backend: str
    layout: DeployLayout
    private: TierProcess
    dsn_file: Path | None = None

    def env(self) -> dict[str, str]:
        env = tier_env()
        if self.dsn_file is not None:
            env |= {
                "SPLITVAULT_PUBLIC_STATE_BACKEND": "postgres",
                "SPLITVAULT_PUBLIC_POSTGRES_DSN_FILE": str(self.dsn_file),
            }
        return env

    def start_public(self) -> TierProcess:
        return start_public(self.layout.root, self.private.port, env=self.env())

    def create_key(self, name: str) -> str:
        extra = () if self.dsn_file is None else ("--dsn-file", str(self.dsn_file))
        result = cli("keys", "create", "--name", name, *extra, deploy=self.layout.root)
        assert result.returncode == 0, result.stdout + result.stderr
        secret = result.stdout.split("once only", 1)[1].split()[-1]
        assert parse_key_id(secret) is not None, result.stdout
        return secret

    def execute(self, *statements: str) -> list[tuple[object, ...]]:
        """Run ``statements`` on the audit store; the last one's rows."""
        if self.dsn_file is not None:
            with psycopg.connect(self.dsn_file.read_text().strip(), autocommit=True) as conn:
                for statement in statements:
                    cursor = conn.execute(statement.encode())
                return cursor.fetchall() if cursor.description else []
        with sqlite3.connect(self.layout.public.root / STATE_DIR / AUDIT_DB) as conn:
            for statement in statements:
                rows = conn.execute(statement).fetchall()
            return list(rows)

    def decisions(self, request_ids: list[str]) -> dict[str, list[tuple[str, int]]]:
        """The (decision, status) of every record of ``request_ids``."""
        wanted = set(request_ids)
        rows = self.execute("SELECT request_id, decision, status FROM audit")
        found: dict[str, list[tuple[str, int]]] = {}
        for rid, decision, status in rows:
            if rid not in wanted:
                continue
            found.setdefault(str(rid), []).append((str(decision), int(str(status))))
        return found

    def fail_writes(self) -> None:
        self.execute(*(POSTGRES_FAIL if self.dsn_file else SQLITE_FAIL))

    def allow_writes(self) -> None:
        if self.dsn_file is not None:
            self.execute("DROP TRIGGER fail_inserts ON audit", "DROP FUNCTION refuse_insert()")
        else:
            self.execute("DROP TRIGGER fail_inserts")


@pytest.fixture(scope="module")
def private_layout(
    deployment: Deployment, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[DeployLayout, TierProcess]]:
    root = tmp_path_factory.mktemp("audit-commit") / "d"
    layout = copy_deployment(deployment.layout, root, keep_public_state=False)
    private = start_private(root, env=tier_env())
    try:
        yield layout, private
    finally:
        private.stop()


@pytest.fixture(scope="module", params=BACKENDS)
def store(
    request: pytest.FixtureRequest, private_layout: tuple[DeployLayout, TierProcess]
) -> Store:
    layout, private = private_layout
    if request.param == "sqlite":
        return Store("sqlite", layout, private)
    server: PostgresServer = request.getfixturevalue("postgres_server")
    dsn_file = layout.root.parent / "postgres.dsn"
    if not dsn_file.exists():
        dsn_file.write_text(server.create_database("audit_commit") + "\n")
        dsn_file.chmod(0o600)
    return Store("postgres", layout, private, dsn_file)


def _client(store: Store, tier: TierProcess, secret: str) -> httpx.AsyncClient:
    context = ssl.create_default_context(cafile=str(store.layout.public.ca_cert))
    return httpx.AsyncClient(
        base_url=f"https://localhost:{tier.port}",
        verify=context,
        headers={"Authorization": f"Bearer {secret}"},
        timeout=30,
    )


async def _ready_key(store: Store, tier: TierProcess, name: str) -> str:
    secret = store.create_key(f"{name}-{store.backend}")
    async with _client(store, tier, secret) as http:
        reply = await http.post("/v1/terms/accept", json={"version": "1"})
    assert reply.status_code == 200, reply.text
    return secret


async def test_a_public_tier_killed_right_after_an_answer_has_committed_its_record(
    store: Store, digits_model: DigitsFixture
) -> None:
    tier = store.start_public()
    try:
        secret = await _ready_key(store, tier, "killed")
        ids = [uuid.uuid4().hex for _ in range(8)]
        body = image_request(digits_model.data.test_x[:1])
        async with _client(store, tier, secret) as http:
            pending = {
                asyncio.ensure_future(http.post(INFER, json={**body, "id": rid})): rid
                for rid in ids
            }
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            tier.process.kill()  # SIGKILL: no shutdown, no flush
            tier.process.wait(30)
            answered = [pending[task] for task in done if task.result().status_code == 200]
            await asyncio.gather(*pending, return_exceptions=True)  # the rest: connection lost
    finally:
        tier.stop()
    assert answered, [task.result().text for task in done]
    recorded = store.decisions(answered)
    assert recorded == {rid: [("served", 200)] for rid in answered}


async def test_a_store_that_refuses_writes_sends_no_answer_without_a_record(
    store: Store, digits_model: DigitsFixture
) -> None:
    tier = store.start_public()
    try:
        secret = await _ready_key(store, tier, "refused")
        body = image_request(digits_model.data.test_x[:1])
        statuses: dict[str, int] = {}
        async with _client(store, tier, secret) as http:

            async def send() -> httpx.Response:
                rid = uuid.uuid4().hex
                reply = await http.post(INFER, json={**body, "id": rid})
                statuses[rid] = reply.status_code
                return reply

            assert (await send()).status_code == 200
            store.fail_writes()
            try:
                refused = [await send() for _ in range(3)]
            finally:
                store.allow_writes()
            for reply in refused:
                assert reply.status_code == 503, reply.text
                assert "audit trail cannot write" in reply.json()["error"], reply.text
                assert int(reply.headers["retry-after"]) >= 1
            for _ in range(150):  # resumes by itself, the tiers not restarted
                if (await send()).status_code == 200:
                    break
                await asyncio.sleep(0.2)
            else:
                pytest.fail("serving did not resume once the store took writes again")
    finally:
        tier.stop()
    recorded = store.decisions(list(statuses))
    for rid, status in statuses.items():
        served = [entry for entry in recorded.get(rid, []) if entry[0] == "served"]
        assert served == ([("served", 200)] if status == 200 else []), (rid, status, recorded)
    assert tier.wait_for_events("audit_write_failed")
