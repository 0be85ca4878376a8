"""Two public tiers sharing one real redis-server: one limit for both, and failing closed.

A module-scoped copy of the session deployment (without MiniLM) runs one private tier and two
public tiers with ``rate_limit_backend = "redis"``; the same API key is used through both.
"""

from __future__ import annotations

import asyncio
import ssl
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from shared.layout import DeployLayout
from tests.conftest import Deployment, DigitsFixture, issue_key
from tests.support.deployments import copy_deployment
from tests.support.processes import TierProcess, start_private, start_public
from tests.support.redis_server import RedisServer, redis_server_fixture
from tests.support.stack import image_request, tier_env

pytestmark = pytest.mark.slow

BURST = 5
# One unit per 1000 s: no stall of a loaded machine refills one while a test fires its requests.
RATE_PER_S = 0.001
INFER = "/v2/models/digits/infer"
LINK = '</v1/terms>; rel="terms-of-service"'

redis_server = redis_server_fixture(scope="module")


@dataclass
class RedisStack:
    """The copy's tiers: one private, two public replicas sharing Redis; and the API keys."""

    layout: DeployLayout
    private: TierProcess
    replicas: list[TierProcess]
    keys: dict[str, str]

    def client(self, replica: TierProcess, key: str) -> httpx.AsyncClient:
        context = ssl.create_default_context(cafile=str(self.layout.public.ca_cert))
        return httpx.AsyncClient(
            base_url=f"https://localhost:{replica.port}",
            verify=context,
            headers={"Authorization": f"Bearer {key}"},
            timeout=30,
        )


@pytest.fixture(scope="module")
def stack(
    deployment: Deployment, redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RedisStack]:
    root = tmp_path_factory.mktemp("protection-redis") / "d"
    copy_deployment(deployment.layout, root, keep_public_state=False)
    layout = DeployLayout(root)
    keys = {name: issue_key(layout, name) for name in ("outage",)}
    env = tier_env(
        rate_limit_backend="redis",
        redis_url=redis_server.url,
        key_limits__rate_per_s=RATE_PER_S,
        key_limits__burst=BURST,
    )
    private = start_private(root, env=tier_env())
    replicas: list[TierProcess] = []
    try:
        for _ in range(2):
            replicas.append(start_public(root, private.port, env=env))
        yield RedisStack(layout, private, replicas, keys)
    finally:
        for replica in replicas:
            replica.stop()
        private.stop()


def _body(digits: DigitsFixture, n: int = 1) -> dict[str, Any]:
    return image_request(digits.data.test_x[:n])


async def test_two_replicas_admit_the_burst_once_together(
    stack: RedisStack, digits_model: DigitsFixture
) -> None:
    """Each replica alone would admit the burst; sharing Redis, both together admit it once."""
    body, per_replica = _body(digits_model), 3 * BURST
    shared = issue_key(stack.layout, f"shared-{uuid.uuid4().hex[:8]}")  # a burst of its own
    clients = [stack.client(replica, shared) for replica in stack.replicas]
    try:
        replies = await asyncio.gather(
            *(client.post(INFER, json=body) for client in clients for _ in range(per_replica))
        )
    finally:
        for client in clients:
            await client.aclose()
    statuses = [reply.status_code for reply in replies]
    assert set(statuses) <= {200, 429}, [r.text for r in replies if r.status_code not in (200, 429)]
    admitted = statuses.count(200)
    assert admitted == BURST, f"{admitted} admitted by two replicas sharing a burst of {BURST}"
    for replica_statuses in (statuses[:per_replica], statuses[per_replica:]):
        assert 429 in replica_statuses  # both replicas refused some
    refused = next(r for r in replies if r.status_code == 429)
    assert int(refused.headers["retry-after"]) >= 1
    assert f'"burst";q={BURST}' in refused.headers["ratelimit-policy"]


async def test_redis_down_fails_closed_then_recovers(
    stack: RedisStack, redis_server: RedisServer, digits_model: DigitsFixture
) -> None:
    body = _body(digits_model)
    clients = [stack.client(replica, stack.keys["outage"]) for replica in stack.replicas]
    try:
        assert [(await c.post(INFER, json=body)).status_code for c in clients] == [200, 200]
        redis_server.stop()
        try:
            for client in clients:
                started = time.monotonic()
                reply = await client.post(INFER, json=body)
                # Does not hang: the tier's Redis calls time out after 0.5 s; a refused
                # connection fails at once. 5 s, ten times that, leaves room for a loaded machine.
                assert time.monotonic() - started < 5.0
                assert reply.status_code == 503, reply.text
                assert list(reply.json()) == ["error"]
                assert (
                    "unavailable" in reply.json()["error"] or "unreachable" in reply.json()["error"]
                )
                assert int(reply.headers["retry-after"]) >= 1
                assert reply.headers["link"] == LINK
        finally:
            redis_server.start()  # same port
        for client in clients:
            statuses = []
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                statuses.append((await client.post(INFER, json=body)).status_code)
                if statuses[-1] == 200:
                    break
                await asyncio.sleep(0.2)
            assert statuses[-1] == 200, statuses
    finally:
        for client in clients:
            await client.aclose()
