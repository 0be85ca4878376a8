"""Burst-tolerant rate limits (GCRA) and daily quotas per subject, with two backends.

* ``MemoryRateLimiter``: the embedded default, one process.
* ``RedisRateLimiter``: several public replicas sharing one Redis, exact under concurrency.

A subject is whatever is limited, e.g. ``"key:k_123:model:digits"`` or
``"ip:1.2.3.4:model:digits"``. One check decides both limits at once: a request refused by either
consumes nothing from the other, and ``check_many`` extends that to several subjects.

Headers follow draft-ietf-httpapi-ratelimit-headers (-08 and later), Structured Field lists:

* ``RateLimit-Policy: "burst";q=20;w=2, "daily";q=10000;w=86400``: the burst policy admits
  ``q = burst`` requests at once and refills at ``rate``, so its window is ``w = burst / rate``
  seconds (rounded up, at least 1); the daily quota resets at UTC midnight.
* ``RateLimit: "burst";r=5;t=2``: for the decision's limit (the one that refused, else the one
  with less left), ``r`` units remaining and ``t`` seconds (rounded up) until it is whole again.
* ``Retry-After``: on refusal only, whole seconds rounded up, at least 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

from public_api.ratelimit.memory import MemoryRateLimiter
from public_api.ratelimit.redis import RedisRateLimiter
from shared.gcra import EPSILON_S, Decision, LimitPolicy

__all__ = [
    "Decision",
    "LimitPolicy",
    "MemoryRateLimiter",
    "RateLimiter",
    "RedisRateLimiter",
    "policy_header",
    "ratelimit_headers",
]


class RateLimiter(Protocol):
    """What the public tier needs from a rate-limit store."""

    async def check(self, subject: str, policy: LimitPolicy, *, cost: int = 1) -> Decision:
        """Admit (and count) or refuse one request of ``cost`` units for ``subject``."""
        ...

    async def check_many(
        self, checks: Sequence[tuple[str, LimitPolicy]], *, cost: int = 1
    ) -> list[Decision]:
        """One decision per subject; counted only if every subject admits the request."""
        ...

    async def ping(self) -> bool:
        """Whether the store answers."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


def policy_header(policy: LimitPolicy) -> str:
    """The ``RateLimit-Policy`` value for ``policy``."""
    window = max(1, math.ceil(policy.burst / policy.rate_per_s))
    members = [f'"burst";q={policy.burst};w={window}']
    if policy.daily_quota is not None:
        members.append(f'"daily";q={policy.daily_quota};w=86400')
    return ", ".join(members)


def ratelimit_headers(decision: Decision, policy: LimitPolicy) -> dict[str, str]:
    """``RateLimit-Policy``, ``RateLimit`` and, when refused, ``Retry-After``."""
    reset = max(0, _whole_seconds(decision.reset_s))
    headers = {
        "RateLimit-Policy": policy_header(policy),
        "RateLimit": f'"{decision.limit_name}";r={decision.remaining};t={reset}',
    }
    if not decision.allowed:
        headers["Retry-After"] = str(max(1, _whole_seconds(decision.retry_after_s)))
    return headers


def _whole_seconds(seconds: float) -> int:
    """Round up, ignoring float noise (2.0000000001 s is 2 s)."""
    return math.ceil(seconds - EPSILON_S)
