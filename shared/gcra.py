"""Rate-limit arithmetic: GCRA for the burst limit, a UTC-day counter for the quota.

Both tiers use it: the public tier's limiters (``public_api.ratelimit``) and the private tier's
admission (``private_core.admission``).

GCRA (generic cell rate algorithm) keeps one number per subject, the theoretical arrival time
``tat``. With emission interval ``T = 1 / rate`` and ``burst`` requests allowed at once, a request
of ``cost`` units arriving at ``now`` is admitted when ``max(tat, now) + cost * T - now <=
burst * T`` (the classic form with tolerance ``tau = T * (burst - 1)``), and then ``tat`` becomes
``max(tat, now) + cost * T``. A refused request changes nothing.

Both tiers' Redis backends run the same formulas in Lua (``shared/gcra_redis.py``); keep the
two in step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

DAY_S = 86_400
QUOTA_TTL_S = 2 * DAY_S  # a day's counter outlives its day, then expires
EPSILON_S = 1e-6  # float slack: burst * T summed from many T's must still admit the last one

LimitName = Literal["burst", "daily"]


@dataclass(frozen=True)
class LimitPolicy:
    """A GCRA rate with a burst, and an optional daily quota (UTC days), for one subject."""

    rate_per_s: float
    burst: int
    daily_quota: int | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.rate_per_s) and self.rate_per_s > 0):
            raise ValueError(f"rate_per_s must be a positive number, got {self.rate_per_s!r}")
        if self.burst < 1:
            raise ValueError(f"burst must be at least 1, got {self.burst!r}")
        if self.daily_quota is not None and self.daily_quota < 0:
            raise ValueError(f"daily_quota must be >= 0 or None, got {self.daily_quota!r}")

    @property
    def interval_s(self) -> float:
        """The emission interval ``T``: seconds one unit of allowance takes to come back."""
        return 1.0 / self.rate_per_s


@dataclass(frozen=True)
class Decision:
    """The verdict on one request for one subject.

    ``limit_name`` is the limit that refused it, or, when admitted, the one with less left.
    ``remaining``: units still available now; ``reset_s``: seconds until that limit is whole
    again (burst fully refilled, or the quota's UTC midnight); ``retry_after_s``: seconds until a
    retry can succeed (0 when allowed).
    """

    allowed: bool
    limit_name: LimitName
    remaining: int
    reset_s: float
    retry_after_s: float


@dataclass(frozen=True)
class Verdict:
    """One limit's answer, before the two are combined into a ``Decision``."""

    allowed: bool
    remaining: int
    reset_s: float
    retry_after_s: float


def check_cost(cost: int) -> None:
    """Refuse a cost below one unit (a cost above the burst is valid and always refused)."""
    if cost < 1:
        raise ValueError(f"cost must be at least 1, got {cost!r}")


def burst_verdict(policy: LimitPolicy, cost: int, tat: float, now: float) -> tuple[Verdict, float]:
    """The GCRA verdict and the new ``tat`` (unchanged when refused)."""
    interval = policy.interval_s
    window = policy.burst * interval
    base = max(tat, now)
    new_tat = base + cost * interval
    if new_tat - now <= window + EPSILON_S:
        left = _units(window - (new_tat - now), interval)
        return Verdict(True, left, new_tat - now, 0.0), new_tat
    left = _units(window - (base - now), interval)
    return Verdict(False, left, base - now, new_tat - window - now), tat


def daily_verdict(
    policy: LimitPolicy, cost: int, used: int, to_midnight_s: float
) -> Verdict | None:
    """The quota verdict given the units already used today, or None without a quota."""
    quota = policy.daily_quota
    if quota is None:
        return None
    if used + cost <= quota:
        return Verdict(True, quota - used - cost, to_midnight_s, 0.0)
    return Verdict(False, max(0, quota - used), to_midnight_s, to_midnight_s)


def decide(burst: Verdict, daily: Verdict | None) -> Decision:
    """Combine both limits: the refusal with the longest wait, else the tighter admission."""
    named: list[tuple[LimitName, Verdict]] = [("burst", burst)]
    if daily is not None:
        named.append(("daily", daily))
    refused = [item for item in named if not item[1].allowed]
    if refused:
        name, verdict = max(refused, key=lambda item: item[1].retry_after_s)
    else:
        name, verdict = min(named, key=lambda item: item[1].remaining)
    return Decision(
        verdict.allowed, name, verdict.remaining, verdict.reset_s, verdict.retry_after_s
    )


@dataclass(slots=True)
class CounterState:
    """One subject's state: GCRA's ``tat`` (on the caller's clock) and its UTC day's usage."""

    tat: float
    day: int  # UTC day number of ``used``
    used: int


def check_states(
    checks: Sequence[tuple[CounterState | None, LimitPolicy]],
    cost: int,
    now: float,
    wall_s: float,
) -> tuple[list[Decision], list[CounterState]]:
    """Decide ``cost`` units against each (state, policy); return the decisions and the states
    to store if every one admits (the caller stores none of them otherwise)."""
    check_cost(cost)
    day, to_midnight = utc_day(wall_s)
    decisions: list[Decision] = []
    updates: list[CounterState] = []
    for state, policy in checks:
        tat = state.tat if state is not None else now
        used = state.used if state is not None and state.day == day else 0
        burst, new_tat = burst_verdict(policy, cost, tat, now)
        decisions.append(decide(burst, daily_verdict(policy, cost, used, to_midnight)))
        updates.append(CounterState(new_tat, day, used + cost))
    return decisions, updates


def utc_day(wall_s: float) -> tuple[int, float]:
    """The UTC day number (days since 1970-01-01) and the seconds left until its midnight."""
    day = int(wall_s // DAY_S)
    return day, (day + 1) * DAY_S - wall_s


def _units(seconds: float, interval: float) -> int:
    return max(0, math.floor(seconds / interval + EPSILON_S))
