"""Rate limits shared by several public replicas: one Lua script per check, Redis's own clock.

The script and its reply live in ``shared.gcra_redis`` (the private tier's shared budgets run
the same one on the private tier's own Redis): loaded once, then called by SHA with EVALSHA, it
decides every subject of a check and writes only if all admit, inside Redis, so concurrent
replicas can never admit more than the limits together.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

from redis.asyncio import Redis

from public_api.redis_client import redis_client
from shared.errors import Unavailable
from shared.gcra import Decision, LimitPolicy
from shared.gcra_redis import GCRA_SCRIPT, STORE_ERRORS, decisions, script_call
from shared.logs import get_logger

log = get_logger(__name__)

WARN_EVERY_S = 10.0  # while the store is down, one warning per this many seconds


class RedisRateLimiter:
    """GCRA and daily quotas in Redis, exact across processes (see the module docstring).

    When Redis cannot answer within ``timeout_s``: raise ``Unavailable`` (the default, a 503),
    or with ``fail_open`` admit the request and log a warning. Connections are made on demand,
    so the limiter recovers by itself once Redis is back.
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "splitvault:rl:",
        fail_open: bool = False,
        timeout_s: float = 0.5,
        max_connections: int = 64,
    ) -> None:
        self._redis: Redis = redis_client(url, timeout_s=timeout_s, max_connections=max_connections)
        self._script = self._redis.register_script(GCRA_SCRIPT)
        self._prefix = prefix
        self._fail_open = fail_open
        self._timeout_s = timeout_s
        self._down_since: float | None = None
        self._warned_at = float("-inf")

    async def check(self, subject: str, policy: LimitPolicy, *, cost: int = 1) -> Decision:
        """Admit or refuse one request of ``cost`` units for ``subject``."""
        return (await self.check_many([(subject, policy)], cost=cost))[0]

    async def check_many(
        self, checks: Sequence[tuple[str, LimitPolicy]], *, cost: int = 1
    ) -> list[Decision]:
        """Check several subjects at once; state changes only if every one admits the request."""
        keys, args = script_call(self._prefix, checks, cost)
        try:
            async with asyncio.timeout(self._timeout_s):
                reply = await self._script(keys=keys, args=args)
        except STORE_ERRORS as error:
            self._store_down(error)
            if not self._fail_open:
                raise Unavailable("rate limit store unavailable", retry_after_s=1) from error
            return [_unlimited(policy, cost) for _, policy in checks]
        self._store_up()
        return decisions(reply, len(checks))

    async def ping(self) -> bool:
        """Whether Redis answers within the timeout."""
        try:
            async with asyncio.timeout(self._timeout_s):
                return bool(await self._redis.ping())
        except STORE_ERRORS:
            return False

    async def close(self) -> None:
        """Close the connections."""
        await self._redis.aclose()

    def _store_down(self, error: BaseException) -> None:
        now = time.monotonic()
        if self._down_since is None:
            self._down_since = now
        if now - self._warned_at >= WARN_EVERY_S:
            self._warned_at = now
            log.warning(
                "ratelimit_store_unavailable",
                error=f"{type(error).__name__}: {error}",
                fail_open=self._fail_open,
                action="admitting without limits" if self._fail_open else "refusing with 503",
                down_for_s=round(now - self._down_since, 3),
            )

    def _store_up(self) -> None:
        if self._down_since is not None:
            log.info(
                "ratelimit_store_recovered",
                down_for_s=round(time.monotonic() - self._down_since, 3),
            )
            self._down_since = None
            self._warned_at = float("-inf")


def _unlimited(policy: LimitPolicy, cost: int) -> Decision:
    """What fail-open answers while the store is down: admitted, the burst shown as untouched."""
    return Decision(True, "burst", max(0, policy.burst - cost), 0.0, 0.0)
