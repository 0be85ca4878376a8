"""Keep the private tier's health true to its private store (``[state_store]``).

While the store does not answer, every call is refused (``private_core.private_redis``), so the
tier reports NOT_SERVING for its inference service and the overall ``""`` status too, and
SERVING again once the store answers: a probe, a load balancer or the public tier then sees what
a call would get. Each change is logged (``private_tier_not_serving`` / ``private_tier_serving``
with the reason) and ``splitvault_private_store_ok`` is 1 while the store answers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import redis.asyncio
from grpc_health.v1 import health_pb2
from prometheus_client import CollectorRegistry, Gauge

from private_core.private_redis import STORE_FAILURES, async_client
from private_core.private_redis_settings import StateStoreSettings
from shared.logs import get_logger

log = get_logger(__name__)
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
UNREACHABLE = "the private store is unreachable"


async def answers(client: redis.asyncio.Redis, timeout_s: float) -> bool:
    """Whether the store answers an authenticated PING within ``timeout_s``."""
    try:
        async with asyncio.timeout(timeout_s):
            return bool(await client.ping())
    except STORE_FAILURES:  # TimeoutError (asyncio.timeout's) is an OSError
        return False


async def keep_store_health(
    health: Any,
    services: Sequence[str],
    serving: Any,
    store: StateStoreSettings,
    registry: CollectorRegistry,
    interval_s: float = 1.0,
) -> None:
    """Ping ``store`` every ``interval_s`` and set ``services`` in ``health`` (the grpc_health
    servicer) to ``serving`` (the status the models allow) while it answers, NOT_SERVING while
    not. Runs until cancelled; the tier starts only once the store answered."""
    ok = Gauge(
        "splitvault_private_store_ok",
        "1 while the private store answers the tier's health ping.",
        registry=registry,
    )
    ok.set(1)
    up, client = True, async_client(store)
    try:
        while True:
            await asyncio.sleep(interval_s)
            now = await answers(client, store.timeout_s * 2)  # connect, then the PING
            ok.set(1 if now else 0)
            if now != up:
                up = now
                await _report(health, services, serving if up else NOT_SERVING, up)
    finally:
        await client.aclose()


async def _report(health: Any, services: Sequence[str], status: Any, up: bool) -> None:
    if up:
        log.info("private_tier_serving", reason="the private store answers again")
    else:
        log.error("private_tier_not_serving", reason=UNREACHABLE, action="health NOT_SERVING")
    for service in services:
        await health.set(service, status)
