"""The extraction monitor's state shared by two real public replicas on one real redis-server.

Issue 12, finding 8: updates made by read-modify-write lost each other's statistics across
replicas, unreadable state read as "ok", and a Redis restart unblocked every key. A
module-scoped copy of the session deployment (without MiniLM) runs one private tier and two
public replicas with ``rate_limit_backend = "redis"`` and the monitor set to ``block``; Redis
runs without persistence, so a restart starts it empty.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import numpy as np
import pytest
import redis

from public_api.keys import parse_key_id
from public_api.monitor import RedisMonitorStore
from public_api.monitor.state import key_state_from_bytes
from shared.layout import DeployLayout
from tests.conftest import Deployment, DigitsFixture, issue_key
from tests.support.deployments import copy_deployment
from tests.support.processes import TierProcess, start_private, start_public
from tests.support.redis_server import RedisServer, redis_server_fixture
from tests.support.stack import cli, image_request, tier_env

pytestmark = pytest.mark.slow

INFER = "/v2/models/digits/infer"
STATE_PREFIX = "splitvault:mon:"  # RedisMonitorStore's default
REQUESTS_PER_REPLICA, BATCH = 24, 3

redis_server = redis_server_fixture(scope="module")


@dataclass
class Replicas:
    """The copy's private tier and its two public replicas sharing Redis."""

    layout: DeployLayout
    private: TierProcess
    replicas: list[TierProcess]

    def client(self, replica: TierProcess, secret: str) -> httpx.Client:
        context = ssl.create_default_context(cafile=str(self.layout.public.ca_cert))
        return httpx.Client(
            base_url=f"https://localhost:{replica.port}",
            verify=context,
            headers={"Authorization": f"Bearer {secret}"},
            timeout=30,
        )

    def async_client(self, replica: TierProcess, secret: str) -> httpx.AsyncClient:
        context = ssl.create_default_context(cafile=str(self.layout.public.ca_cert))
        return httpx.AsyncClient(
            base_url=f"https://localhost:{replica.port}",
            verify=context,
            headers={"Authorization": f"Bearer {secret}"},
            timeout=30,
        )

    def key(self, name: str) -> tuple[str, str]:
        """A new API key that accepted the terms: (secret, key id)."""
        secret = issue_key(self.layout, name)
        key_id = parse_key_id(secret)
        assert key_id is not None
        return secret, key_id


@pytest.fixture(scope="module")
def stack(
    deployment: Deployment, redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Replicas]:
    root = tmp_path_factory.mktemp("monitor-redis") / "d"
    layout = copy_deployment(deployment.layout, root, keep_public_state=False)
    env = tier_env(rate_limit_backend="redis", redis_url=redis_server.url, monitor_action="block")
    private = start_private(root, env=tier_env())
    replicas: list[TierProcess] = []
    try:
        for _ in range(2):
            replicas.append(start_public(root, private.port, env=env))
        yield Replicas(layout, private, replicas)
    finally:
        for replica in replicas:
            replica.stop()
        private.stop()


def _block(stack: Replicas, replica: TierProcess, secret: str) -> None:
    """Send uniform noise through ``replica`` until the monitor blocks the key (403)."""
    rng = np.random.default_rng(0)
    with stack.client(replica, secret) as http:
        for _ in range(40):  # about 24 batches of 64 are blocked
            noise = rng.uniform(0.0, 1.0, (64, 1, 8, 8)).astype(np.float32)
            reply = http.post(INFER, json=image_request(noise))
            if reply.status_code != 200:
                break
    assert reply.status_code == 403 and "blocked" in reply.json()["error"], reply.text


def _status(stack: Replicas, replica: TierProcess, secret: str, digits: DigitsFixture) -> int:
    with stack.client(replica, secret) as http:
        return http.post(INFER, json=image_request(digits.data.test_x[:1])).status_code


def _until_served(stack: Replicas, secret: str, digits: DigitsFixture) -> None:
    """Wait until each replica serves ``secret`` (after Redis restarted, or a clear applied)."""
    for replica in stack.replicas:
        statuses: list[int] = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            statuses.append(_status(stack, replica, secret, digits))
            if statuses[-1] == 200:
                break
            time.sleep(0.2)
        assert statuses[-1] == 200, statuses


async def test_two_replicas_hammering_one_key_lose_no_update(
    stack: Replicas, redis_server: RedisServer, digits_model: DigitsFixture
) -> None:
    secret, key_id = stack.key("hammer")
    images = digits_model.data.test_x
    clients = [stack.async_client(replica, secret) for replica in stack.replicas]
    bodies = [
        image_request(images[i * BATCH : (i + 1) * BATCH]) for i in range(2 * REQUESTS_PER_REPLICA)
    ]
    try:
        replies = await asyncio.gather(
            *(
                clients[i % 2].post(INFER, json=body)  # the two replicas interleaved
                for i, body in enumerate(bodies)
            )
        )
    finally:
        for client in clients:
            await client.aclose()
    assert [reply.status_code for reply in replies] == [200] * len(bodies), [
        reply.text for reply in replies if reply.status_code != 200
    ]
    store = RedisMonitorStore(redis_server.url)
    try:
        data = await store.get(key_id)
    finally:
        await store.close()
    assert data is not None
    assert key_state_from_bytes(data).queries == len(bodies) * BATCH  # every sample, once


def test_a_block_through_one_replica_is_refused_by_the_other(
    stack: Replicas, digits_model: DigitsFixture
) -> None:
    secret, key_id = stack.key("blocked-on-a")
    replica_a, replica_b = stack.replicas
    assert _status(stack, replica_b, secret, digits_model) == 200
    _block(stack, replica_a, secret)
    with stack.client(replica_b, secret) as http:
        reply = http.post(INFER, json=image_request(digits_model.data.test_x[:1]))
    assert reply.status_code == 403, reply.text
    assert f"API key {key_id} is blocked" in reply.json()["error"]


def test_a_block_survives_a_redis_restart_until_cleared(
    stack: Replicas, redis_server: RedisServer, digits_model: DigitsFixture
) -> None:
    secret, key_id = stack.key("blocked-before-restart")
    control, _ = stack.key("control")
    _block(stack, stack.replicas[0], secret)
    redis_server.stop()
    redis_server.start()  # empty: no persistence
    with redis.Redis.from_url(redis_server.url) as raw:
        assert raw.exists(STATE_PREFIX + key_id) == 0
    _until_served(stack, control, digits_model)  # both replicas talk to the new Redis
    for replica in stack.replicas:
        assert _status(stack, replica, secret, digits_model) == 403  # still blocked on both

    result = cli("monitor", "clear", key_id, deploy=stack.layout.root)
    assert result.returncode == 0, result.stderr
    _until_served(stack, secret, digits_model)  # the clear lifts the lasting decision too


def test_unreadable_state_is_refused_on_both_replicas(
    stack: Replicas, redis_server: RedisServer, digits_model: DigitsFixture
) -> None:
    secret, key_id = stack.key("garbled")
    assert _status(stack, stack.replicas[0], secret, digits_model) == 200  # it has state now
    with redis.Redis.from_url(redis_server.url) as raw:
        assert raw.exists(STATE_PREFIX + key_id) == 1
        raw.hset(STATE_PREFIX + key_id, "d", b"\x00garbage")
    for replica in stack.replicas:
        with stack.client(replica, secret) as http:
            reply = http.post(INFER, json=image_request(digits_model.data.test_x[:1]))
        assert reply.status_code == 503, reply.text  # refused, not taken for "ok"
        assert "cannot be read" in reply.json()["error"]
        assert int(reply.headers["retry-after"]) >= 1
        events = replica.wait_for_events("monitor_state_unreadable")
        assert key_id in {event.get("key_id") for event in events}

    assert cli("monitor", "clear", key_id, deploy=stack.layout.root).returncode == 0
    _until_served(stack, secret, digits_model)  # the operator's clear is the way out
