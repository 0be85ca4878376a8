"""One way to open Redis for the public tier's shared state (limits, monitor)."""

from __future__ import annotations

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff


def redis_client(url: str, *, timeout_s: float = 0.5, max_connections: int = 64) -> Redis:
    """An asyncio Redis client whose every wait is bounded by ``timeout_s``.

    Connections are made on demand, so callers recover by themselves once Redis is back; one
    immediate retry covers a pooled socket that Redis closed meanwhile.
    """
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=timeout_s,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 1),
    )
    return Redis.from_pool(pool)
