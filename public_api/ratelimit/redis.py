"""Rate limits shared by several public replicas: one Lua script per check, Redis's own clock.

The script (loaded once, then called by SHA with EVALSHA) reads the subjects' GCRA state and
today's quota counters, decides, and writes only if every limit admits the request, all inside
Redis, so concurrent replicas can never admit more than the limits together. It reads the time
with ``TIME`` (allowed in scripts since Redis 5, which replicates effects, not scripts), so the
replicas' own clocks do not matter. Keys (``prefix`` first):

* ``gcra:{subject}``: the theoretical arrival time, expiring when it is in the past;
* ``quota:{subject}:{day}``: units used on that UTC day (days since 1970-01-01), kept 2 days.

Script keys are built for one Redis server (or a primary with replicas), not Redis Cluster.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import redis.exceptions
from redis.asyncio import Redis

from public_api.redis_client import redis_client
from shared.errors import Unavailable
from shared.gcra import (
    EPSILON_S,
    QUOTA_TTL_S,
    Decision,
    LimitPolicy,
    Verdict,
    check_cost,
    decide,
)
from shared.logs import get_logger

log = get_logger(__name__)

WARN_EVERY_S = 10.0  # while the store is down, one warning per this many seconds

# Same arithmetic as shared.gcra.burst_verdict / daily_verdict. Floats go back as strings (Redis would
# truncate Lua numbers to integers).
_SCRIPT = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local day = math.floor(tonumber(clock[1]) / 86400)
local cost, eps, quota_ttl = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local out, new_tats, admit = {}, {}, true
for i = 1, #KEYS / 2 do
  local interval, burst = tonumber(ARGV[3 * i + 1]), tonumber(ARGV[3 * i + 2])
  local quota = tonumber(ARGV[3 * i + 3])
  local window = burst * interval
  local tat = tonumber(redis.call('GET', KEYS[2 * i - 1])) or now
  local base = math.max(tat, now)
  new_tats[i] = base + cost * interval
  local ok, left, reset, retry = 1, window - (new_tats[i] - now), new_tats[i] - now, 0
  if new_tats[i] - now > window + eps then
    ok, left, reset, retry = 0, window - (base - now), base - now, new_tats[i] - window - now
    admit = false
  end
  local quota_ok, quota_left = -1, 0
  if quota >= 0 then
    local used = tonumber(redis.call('GET', KEYS[2 * i] .. day)) or 0
    quota_ok, quota_left = 1, quota - used - cost
    if used + cost > quota then
      quota_ok, quota_left, admit = 0, math.max(0, quota - used), false
    end
  end
  left = math.max(0, math.floor(left / interval + eps))
  for _, value in ipairs({ok, left, string.format('%.6f', reset), string.format('%.6f', retry),
                          quota_ok, quota_left}) do
    table.insert(out, value)
  end
end
if admit then
  for i = 1, #KEYS / 2 do
    local ttl_ms = math.ceil((new_tats[i] - now) * 1000) + 1
    redis.call('SET', KEYS[2 * i - 1], string.format('%.6f', new_tats[i]), 'PX', ttl_ms)
    if tonumber(ARGV[3 * i + 3]) >= 0 then
      redis.call('INCRBY', KEYS[2 * i] .. day, cost)
      redis.call('EXPIRE', KEYS[2 * i] .. day, quota_ttl)
    end
  end
end
table.insert(out, string.format('%.6f', (day + 1) * 86400 - now))
return out
"""

_FIELDS = 6  # values the script returns per subject

# Errors that mean "the store cannot answer now", as opposed to a bug in the script.
STORE_ERRORS: tuple[type[BaseException], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.ReadOnlyError,
    TimeoutError,
    OSError,
)


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
        self._script = self._redis.register_script(_SCRIPT)
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
        check_cost(cost)
        subjects = [subject for subject, _ in checks]
        if len(set(subjects)) != len(subjects):
            raise ValueError(f"each subject may appear once per check, got {subjects!r}")
        keys: list[str] = []
        args: list[str | int | float] = [cost, EPSILON_S, QUOTA_TTL_S]
        for subject, policy in checks:
            keys += [f"{self._prefix}gcra:{subject}", f"{self._prefix}quota:{subject}:"]
            quota = -1 if policy.daily_quota is None else policy.daily_quota
            args += [policy.interval_s, policy.burst, quota]
        try:
            async with asyncio.timeout(self._timeout_s):
                reply = await self._script(keys=keys, args=args)
        except STORE_ERRORS as error:
            self._store_down(error)
            if not self._fail_open:
                raise Unavailable("rate limit store unavailable", retry_after_s=1) from error
            return [_unlimited(policy, cost) for _, policy in checks]
        self._store_up()
        return _decisions(reply, len(checks))

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


def _decisions(reply: Any, count: int) -> list[Decision]:
    values = [item.decode() if isinstance(item, bytes) else str(item) for item in reply]
    to_midnight = float(values[-1])
    decisions = []
    for index in range(count):
        ok, left, reset, retry, quota_ok, quota_left = values[
            index * _FIELDS : (index + 1) * _FIELDS
        ]
        burst = Verdict(ok == "1", int(left), float(reset), float(retry))
        daily = None
        if quota_ok != "-1":
            allowed = quota_ok == "1"
            daily = Verdict(allowed, int(quota_left), to_midnight, 0.0 if allowed else to_midnight)
        decisions.append(decide(burst, daily))
    return decisions


def _unlimited(policy: LimitPolicy, cost: int) -> Decision:
    """What fail-open answers while the store is down: admitted, the burst shown as untouched."""
    return Decision(True, "burst", max(0, policy.burst - cost), 0.0, 0.0)
