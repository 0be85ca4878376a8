"""GCRA and daily quotas in one Redis Lua script: the arithmetic of ``shared.gcra``, run inside
Redis so that several processes sharing one server never admit more than the limits together.

Both tiers use it, each on its own Redis: the public tier's shared rate limits
(``public_api.ratelimit.redis``) and the private tier's shared admission budgets
(``private_core.private_redis_budgets``). The script reads the subjects' GCRA state and today's
quota counters, decides, and writes only if every limit admits the request. It reads the time
with ``TIME`` (allowed in scripts since Redis 5, which replicates effects, not scripts), so the
callers' own clocks do not matter. Keys per subject (``prefix`` first):

* ``gcra:{subject}``: the theoretical arrival time, expiring when it is in the past;
* ``quota:{subject}:{day}``: units used on that UTC day (days since 1970-01-01), kept 2 days.

Script keys are built for one Redis server (or a primary with replicas), not Redis Cluster.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis.exceptions

from shared.gcra import EPSILON_S, QUOTA_TTL_S, Decision, LimitPolicy, Verdict, check_cost, decide

# Same arithmetic as shared.gcra.burst_verdict / daily_verdict. Floats go back as strings (Redis
# would truncate Lua numbers to integers).
GCRA_SCRIPT = """
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


FIELDS = 6  # values the script returns per subject

# Errors that mean "the store cannot answer now", as opposed to a bug in the script.
STORE_ERRORS: tuple[type[BaseException], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.ReadOnlyError,
    TimeoutError,
    OSError,
)


def script_call(
    prefix: str, checks: Sequence[tuple[str, LimitPolicy]], cost: int
) -> tuple[list[str], list[str | int | float]]:
    """The script's keys and arguments for ``cost`` units against each (subject, policy)."""
    check_cost(cost)
    subjects = [subject for subject, _ in checks]
    if len(set(subjects)) != len(subjects):
        raise ValueError(f"each subject may appear once per check, got {subjects!r}")
    keys: list[str] = []
    args: list[str | int | float] = [cost, EPSILON_S, QUOTA_TTL_S]
    for subject, policy in checks:
        keys += [f"{prefix}gcra:{subject}", f"{prefix}quota:{subject}:"]
        quota = -1 if policy.daily_quota is None else policy.daily_quota
        args += [policy.interval_s, policy.burst, quota]
    return keys, args


def decisions(reply: Any, count: int) -> list[Decision]:
    """The script's reply as one ``Decision`` per subject, in order."""
    values = [item.decode() if isinstance(item, bytes) else str(item) for item in reply]
    to_midnight = float(values[-1])
    found = []
    for index in range(count):
        ok, left, reset, retry, quota_ok, quota_left = values[index * FIELDS : (index + 1) * FIELDS]
        burst = Verdict(ok == "1", int(left), float(reset), float(retry))
        daily = None
        if quota_ok != "-1":
            allowed = quota_ok == "1"
            daily = Verdict(allowed, int(quota_left), to_midnight, 0.0 if allowed else to_midnight)
        found.append(decide(burst, daily))
    return found
