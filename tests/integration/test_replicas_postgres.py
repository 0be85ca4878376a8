"""Three public replicas on one private tier, sharing one real PostgreSQL and one real Redis.

Issue 15: keys, terms, monitor decisions and the audit trail in PostgreSQL
(``state_backend = "postgres"``), limits and monitor statistics in Redis. The replicas start
together (the schema is migrated once, under an advisory lock); a key created through the CLI
works on all three and its revocation reaches all three within ``key_cache_s``; a quota is
shared, not tripled; a block on one replica holds on the others and outlives a Redis restart;
every admitted request has exactly one audit record across the replicas' chains, committed
before its answer, which verify, and an altered record is found; PostgreSQL stopped under
concurrent load on the three replicas answers 503 + Retry-After without hanging, every 200 the
clients got has its record, and serving resumes by itself once it is back.
"""

from __future__ import annotations

import asyncio
import ssl
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import psycopg
import pytest

from public_api.keys import parse_key_id
from shared.layout import DeployLayout
from tests.conftest import Deployment, DigitsFixture
from tests.support.deployments import copy_deployment
from tests.support.postgres_server import PostgresServer, postgres_server_fixture
from tests.support.processes import TierProcess, start_private, start_public
from tests.support.redis_server import RedisServer, redis_server_fixture
from tests.support.stack import cli, image_request, tier_env

pytestmark = pytest.mark.slow

INFER = "/v2/models/digits/infer"
KEY_CACHE_S = 1.0
QUOTA = 30
CLIENTS_PER_REPLICA = 4
# A request not answered within this is hung: an outage must answer 503 within the pool's
# timeout (postgres_timeout_s, 2 s); 20 s leaves room for a loaded machine.
HANG_S = 20.0

postgres_server = postgres_server_fixture(scope="module")
redis_server = redis_server_fixture(scope="module")


@dataclass
class Replicas:
    """The copy's private tier, its three public replicas, and the shared database's DSN."""

    layout: DeployLayout
    private: TierProcess
    replicas: list[TierProcess]
    dsn_file: Path

    def client(self, replica: TierProcess, secret: str) -> httpx.AsyncClient:
        context = ssl.create_default_context(cafile=str(self.layout.public.ca_cert))
        return httpx.AsyncClient(
            base_url=f"https://localhost:{replica.port}",
            verify=context,
            headers={"Authorization": f"Bearer {secret}"},
            timeout=30,
        )

    def cli(self, *args: str) -> str:
        result = cli(*args, "--dsn-file", str(self.dsn_file), deploy=self.layout.root)
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    def create_key(self, name: str, *extra: str) -> tuple[str, str]:
        """A key made through ``splitvault keys create``: (secret, key id)."""
        out = self.cli("keys", "create", "--name", name, *extra)
        secret = out.split("once only", 1)[1].split()[-1]
        key_id = parse_key_id(secret)
        assert key_id is not None, out
        return secret, key_id

    def sql(self, query: str, *params: object) -> list[tuple[object, ...]]:
        with psycopg.connect(self.dsn_file.read_text().strip(), autocommit=True) as conn:
            cursor = conn.execute(query.encode(), params)
            return cursor.fetchall() if cursor.description else []


@pytest.fixture(scope="module")
def stack(
    deployment: Deployment,
    postgres_server: PostgresServer,
    redis_server: RedisServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Replicas]:
    root = tmp_path_factory.mktemp("replicas-postgres") / "d"
    layout = copy_deployment(deployment.layout, root, keep_public_state=False)
    dsn_file = root.parent / "postgres.dsn"
    dsn_file.write_text(postgres_server.create_database("splitvault") + "\n")
    dsn_file.chmod(0o600)
    env = tier_env(
        rate_limit_backend="redis",
        redis_url=redis_server.url,
        monitor_action="block",
        key_cache_s=KEY_CACHE_S,
    )
    env |= {
        "SPLITVAULT_PUBLIC_STATE_BACKEND": "postgres",
        "SPLITVAULT_PUBLIC_POSTGRES_DSN_FILE": str(dsn_file),
    }
    private = start_private(root, env=tier_env())
    replicas: list[TierProcess] = []
    try:
        with ThreadPoolExecutor(3) as pool:  # started together: the migrations must not race
            starts = [
                pool.submit(
                    start_public,
                    root,
                    private.port,
                    env={**env, "SPLITVAULT_PUBLIC_REPLICA_NAME": f"public-{i}"},
                )
                for i in range(3)
            ]
            replicas = [start.result() for start in starts]
        yield Replicas(layout, private, replicas, dsn_file)
    finally:
        for replica in replicas:
            replica.stop()
        private.stop()


def _body(digits: DigitsFixture, n: int = 1, request_id: str | None = None) -> dict[str, object]:
    extra = {"id": request_id} if request_id else {}
    return image_request(digits.data.test_x[:n], **extra)


async def _accept_terms(stack: Replicas, secret: str) -> None:
    async with stack.client(stack.replicas[0], secret) as http:
        reply = await http.post("/v1/terms/accept", json={"version": "1"})
    assert reply.status_code == 200, reply.text


async def _statuses(stack: Replicas, secret: str, digits: DigitsFixture) -> list[int]:
    statuses = []
    for replica in stack.replicas:
        async with stack.client(replica, secret) as http:
            statuses.append((await http.post(INFER, json=_body(digits))).status_code)
    return statuses


async def test_a_cli_key_works_on_all_three_and_its_revocation_reaches_all(
    stack: Replicas, digits_model: DigitsFixture
) -> None:
    migrated = [e for r in stack.replicas for e in r.events() if e.get("event") == "state_migrated"]
    assert len(migrated) == 1, migrated  # three replicas started together: one migration
    secret, key_id = stack.create_key("everywhere")
    await _accept_terms(stack, secret)
    assert await _statuses(stack, secret, digits_model) == [200, 200, 200]
    assert key_id in stack.cli("keys", "list")
    revoked_at = time.monotonic()
    stack.cli("keys", "revoke", key_id)
    while time.monotonic() < revoked_at + KEY_CACHE_S:  # every cached entry has expired after
        await asyncio.sleep(0.05)
    assert await _statuses(stack, secret, digits_model) == [401, 401, 401]


async def test_clients_over_three_replicas_admit_the_quota_once(
    stack: Replicas, digits_model: DigitsFixture
) -> None:
    secret, _ = stack.create_key("quota", "--quota", str(QUOTA))
    await _accept_terms(stack, secret)
    clients = [stack.client(replica, secret) for replica in stack.replicas]
    try:
        replies = await asyncio.gather(
            *(c.post(INFER, json=_body(digits_model)) for c in clients for _ in range(QUOTA))
        )
    finally:
        for client in clients:
            await client.aclose()
    statuses = [reply.status_code for reply in replies]
    assert set(statuses) == {200, 429}, [r.text for r in replies if r.status_code not in (200, 429)]
    assert statuses.count(200) == QUOTA  # one quota for the three, not three


async def _block(stack: Replicas, replica: TierProcess, secret: str) -> None:
    """Send uniform noise through ``replica`` until the monitor blocks the key (403)."""
    rng = np.random.default_rng(0)
    async with stack.client(replica, secret) as http:
        for _ in range(40):
            noise = rng.uniform(0.0, 1.0, (64, 1, 8, 8)).astype(np.float32)
            reply = await http.post(INFER, json=image_request(noise))
            if reply.status_code != 200:
                break
    assert reply.status_code == 403 and "blocked" in reply.json()["error"], reply.text


async def test_a_block_on_one_replica_holds_on_all_and_outlives_redis(
    stack: Replicas, redis_server: RedisServer, digits_model: DigitsFixture
) -> None:
    secret, key_id = stack.create_key("blocked-on-a")
    control, _ = stack.create_key("control")
    for each in (secret, control):
        await _accept_terms(stack, each)
    await _block(stack, stack.replicas[0], secret)
    assert await _statuses(stack, secret, digits_model) == [403, 403, 403]
    assert stack.sql("SELECT level FROM monitor_decisions WHERE key_id = %s", key_id) == [
        ("blocked",)
    ]
    redis_server.stop()
    redis_server.start()  # empty: no persistence
    deadline = time.monotonic() + 20
    while await _statuses(stack, control, digits_model) != [200, 200, 200]:
        assert time.monotonic() < deadline, "replicas did not reach the restarted Redis"
        await asyncio.sleep(0.2)
    assert await _statuses(stack, secret, digits_model) == [403, 403, 403]


async def _serve_ids(stack: Replicas, secret: str, digits: DigitsFixture, n: int) -> list[str]:
    ids = [f"req-{uuid.uuid4().hex}" for _ in range(n)]
    clients = [stack.client(replica, secret) for replica in stack.replicas]
    try:
        replies = await asyncio.gather(
            *(
                clients[i % 3].post(INFER, json=_body(digits, request_id=rid))
                for i, rid in enumerate(ids)
            )
        )
    finally:
        for client in clients:
            await client.aclose()
    assert [r.status_code for r in replies] == [200] * n, [r.text for r in replies]
    return ids


def _recorded(stack: Replicas, ids: list[str]) -> dict[str, int]:
    rows = stack.sql(
        "SELECT request_id, count(*) FROM audit WHERE request_id = ANY(%s) GROUP BY request_id",
        ids,
    )
    return {str(rid): int(str(count)) for rid, count in rows}


async def test_one_audit_record_per_request_across_replicas_verified_and_tamper_found(
    stack: Replicas, digits_model: DigitsFixture
) -> None:
    secret, _ = stack.create_key("audited")
    await _accept_terms(stack, secret)
    ids = await _serve_ids(stack, secret, digits_model, 30)
    assert _recorded(stack, ids) == dict.fromkeys(ids, 1)  # committed before each answer
    chains = stack.sql("SELECT DISTINCT chain_id FROM audit WHERE request_id = ANY(%s)", ids)
    assert len(chains) == 3  # each replica wrote its own chain
    out = stack.cli("audit", "verify")
    assert "3 chains checked, 0 failed" in out, out
    (chain_id, seq, answer), *_ = stack.sql(
        "SELECT chain_id, seq, answer FROM audit WHERE request_id = %s", ids[0]
    )
    stack.sql("UPDATE audit SET answer = %s WHERE chain_id = %s AND seq = %s", "{}", chain_id, seq)
    try:
        result = cli("audit", "verify", "--dsn-file", str(stack.dsn_file), deploy=stack.layout.root)
        assert result.returncode == 1, result.stdout
        assert f"audit chain {chain_id}" in result.stdout
        assert f"record {seq}: hash does not match its contents" in result.stdout
        assert "3 chains checked, 1 failed" in result.stdout
    finally:
        stack.sql(
            "UPDATE audit SET answer = %s WHERE chain_id = %s AND seq = %s", answer, chain_id, seq
        )


@dataclass
class Outcome:
    """One request of the load: its id, replica, status and Retry-After."""

    request_id: str
    replica: int
    status: int
    retry_after: str | None
    after_restart: bool


@dataclass
class Load:
    """Clients sending continuously to every replica until ``stop`` is set."""

    outcomes: list[Outcome]
    stop: asyncio.Event
    restarted: bool = False

    def seen(self, status: int, *, after_restart: bool = False) -> set[int]:
        """The replicas that answered ``status`` (since the restart)."""
        return {
            o.replica
            for o in self.outcomes
            if o.status == status and (o.after_restart or not after_restart)
        }

    async def until(self, condition: Callable[[], bool], what: str) -> None:
        for _ in range(600):  # the load's own requests pace this; 0.1 s between looks
            if condition():
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"not reached: {what}")


async def _client_loop(
    stack: Replicas, load: Load, replica: int, secret: str, digits: DigitsFixture
) -> None:
    """Requests one after another to ``replica``; a request that hangs fails the test."""
    images = digits.data.test_x
    async with stack.client(stack.replicas[replica], secret) as http:
        http.timeout = httpx.Timeout(HANG_S)  # no answer within it: a hang, ReadTimeout
        while not load.stop.is_set():
            rid = f"load-{uuid.uuid4().hex}"
            restarted = load.restarted
            i = len(load.outcomes) % len(images)
            reply = await http.post(INFER, json=image_request(images[i : i + 1], id=rid))
            load.outcomes.append(
                Outcome(
                    rid, replica, reply.status_code, reply.headers.get("retry-after"), restarted
                )
            )
            if reply.status_code != 200:
                await asyncio.sleep(0.05)


async def test_postgres_stopped_under_load_fails_closed_loses_no_record_and_resumes(
    stack: Replicas, postgres_server: PostgresServer, digits_model: DigitsFixture
) -> None:
    """Concurrent clients on all three replicas while PostgreSQL stops and comes back."""
    secret, _ = stack.create_key("outage")
    await _accept_terms(stack, secret)
    load = Load([], asyncio.Event())
    clients = [
        asyncio.create_task(_client_loop(stack, load, replica, secret, digits_model))
        for replica in range(3)
        for _ in range(CLIENTS_PER_REPLICA)
    ]
    everyone = {0, 1, 2}
    try:
        await load.until(lambda: load.seen(200) == everyone, "every replica serving")
        await asyncio.to_thread(postgres_server.stop)
        try:
            await load.until(lambda: load.seen(503) == everyone, "every replica refusing")
        finally:
            await asyncio.to_thread(postgres_server.start)
            load.restarted = True
        await load.until(
            lambda: load.seen(200, after_restart=True) == everyone, "every replica serving again"
        )
    finally:
        load.stop.set()
        results = await asyncio.gather(*clients, return_exceptions=True)
    assert [r for r in results if r is not None] == []  # no client hung or failed
    statuses = Counter(o.status for o in load.outcomes)
    assert set(statuses) == {200, 503}, statuses
    refused = [o for o in load.outcomes if o.status == 503]
    assert all(o.retry_after is not None and int(o.retry_after) >= 1 for o in refused)
    served = [o.request_id for o in load.outcomes if o.status == 200]
    # Committed before each answer was sent: read at once, no waiting for a writer.
    assert _recorded(stack, served) == dict.fromkeys(served, 1)  # no admitted request unrecorded
    assert "0 failed" in stack.cli("audit", "verify")
