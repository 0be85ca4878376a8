"""The in-memory rate limiter: GCRA bursts and refill, daily quotas, headers, the LRU bound."""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, datetime

import pytest

from public_api.ratelimit import (
    LimitPolicy,
    MemoryRateLimiter,
    policy_header,
    ratelimit_headers,
)


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def _wall(iso: str) -> FakeClock:
    return FakeClock(datetime.fromisoformat(iso).replace(tzinfo=UTC).timestamp())


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1000.0)


@pytest.fixture
def wall() -> FakeClock:
    return _wall("2024-05-01T12:00:00")


@pytest.fixture
def limiter(clock: FakeClock, wall: FakeClock) -> MemoryRateLimiter:
    return MemoryRateLimiter(clock=clock, wall_clock=wall)


async def _admitted(limiter: MemoryRateLimiter, subject: str, policy: LimitPolicy, n: int) -> int:
    return sum([(await limiter.check(subject, policy)).allowed for _ in range(n)])


async def test_burst_is_admitted_at_once_then_refused(limiter: MemoryRateLimiter) -> None:
    policy = LimitPolicy(rate_per_s=1.0, burst=5)
    decisions = [await limiter.check("key:a", policy) for _ in range(6)]
    assert [d.allowed for d in decisions] == [True] * 5 + [False]
    assert [d.remaining for d in decisions[:5]] == [4, 3, 2, 1, 0]
    refused = decisions[5]
    assert (refused.allowed, refused.limit_name, refused.remaining) == (False, "burst", 0)
    assert (refused.reset_s, refused.retry_after_s) == pytest.approx((5.0, 1.0))


async def test_refills_at_the_rate_and_never_beyond_the_burst(
    limiter: MemoryRateLimiter, clock: FakeClock
) -> None:
    policy = LimitPolicy(rate_per_s=2.0, burst=4)
    assert await _admitted(limiter, "s", policy, 10) == 4
    clock.advance(0.3)
    assert (await limiter.check("s", policy)).retry_after_s == pytest.approx(0.2)
    clock.advance(0.2)  # one interval (0.5 s) after the burst: exactly one more
    assert await _admitted(limiter, "s", policy, 3) == 1
    clock.advance(60)  # long idle: the burst again, not 120 requests
    assert await _admitted(limiter, "s", policy, 10) == 4


async def test_steady_traffic_at_the_rate_passes_and_twice_the_rate_half_does(
    limiter: MemoryRateLimiter, clock: FakeClock
) -> None:
    policy = LimitPolicy(rate_per_s=10.0, burst=1)
    admitted = 0
    for _ in range(50):
        admitted += (await limiter.check("at-rate", policy)).allowed
        clock.advance(0.1)
    assert admitted == 50
    admitted = 0
    for _ in range(50):
        admitted += (await limiter.check("twice", policy)).allowed
        clock.advance(0.05)
    assert admitted == 25


async def test_retry_after_counts_down_to_the_next_admission(
    limiter: MemoryRateLimiter, clock: FakeClock
) -> None:
    policy = LimitPolicy(rate_per_s=0.25, burst=2)  # one request every 4 s
    await _admitted(limiter, "s", policy, 2)
    refused = await limiter.check("s", policy)
    assert refused.retry_after_s == pytest.approx(4.0)
    assert ratelimit_headers(refused, policy)["Retry-After"] == "4"
    clock.advance(1.5)
    refused = await limiter.check("s", policy)
    assert ratelimit_headers(refused, policy)["Retry-After"] == "3"  # 2.5 s, rounded up
    clock.advance(refused.retry_after_s - 0.01)
    assert not (await limiter.check("s", policy)).allowed
    clock.advance(0.01)
    assert (await limiter.check("s", policy)).allowed


async def test_daily_quota_runs_out_and_comes_back_at_utc_midnight(clock: FakeClock) -> None:
    wall = _wall("2024-05-01T23:59:00")
    limiter = MemoryRateLimiter(clock=clock, wall_clock=wall)
    policy = LimitPolicy(rate_per_s=100.0, burst=100, daily_quota=3)
    decisions = [await limiter.check("s", policy) for _ in range(4)]
    assert [d.allowed for d in decisions] == [True, True, True, False]
    assert decisions[2].limit_name == "daily" and decisions[2].remaining == 0
    refused = decisions[3]
    assert (refused.allowed, refused.limit_name, refused.remaining) == (False, "daily", 0)
    assert (refused.reset_s, refused.retry_after_s) == pytest.approx((60.0, 60.0))
    assert ratelimit_headers(refused, policy)["Retry-After"] == "60"
    wall.advance(59.5)
    clock.advance(59.5)
    assert not (await limiter.check("s", policy)).allowed
    wall.advance(0.5)  # 2024-05-02T00:00:00Z
    clock.advance(0.5)
    fresh = await limiter.check("s", policy)
    assert fresh.allowed and fresh.limit_name == "daily" and fresh.remaining == 2
    assert fresh.reset_s == pytest.approx(86_400.0)


async def test_a_request_refused_by_the_quota_takes_nothing_from_the_burst(
    limiter: MemoryRateLimiter,
) -> None:
    rate_only = LimitPolicy(rate_per_s=0.001, burst=3)
    with_quota = LimitPolicy(rate_per_s=0.001, burst=3, daily_quota=1)
    assert await _admitted(limiter, "s", with_quota, 5) == 1  # 4 refused by the quota
    assert await _admitted(limiter, "s", rate_only, 5) == 2  # the burst still holds 2


async def test_a_request_refused_by_the_burst_takes_nothing_from_the_quota(
    limiter: MemoryRateLimiter,
) -> None:
    tight = LimitPolicy(rate_per_s=0.001, burst=1, daily_quota=5)
    loose = LimitPolicy(rate_per_s=0.001, burst=1000, daily_quota=5)
    assert await _admitted(limiter, "s", tight, 10) == 1  # 9 refused by the burst
    assert await _admitted(limiter, "s", loose, 10) == 4  # the quota still holds 4


async def test_check_many_counts_nothing_unless_every_subject_admits(
    limiter: MemoryRateLimiter,
) -> None:
    key, ip = LimitPolicy(0.001, burst=5), LimitPolicy(0.001, burst=2)
    checks = [("key:k", key), ("ip:1.2.3.4", ip)]
    verdicts = [[d.allowed for d in await limiter.check_many(checks)] for _ in range(4)]
    assert verdicts == [[True, True], [True, True], [True, False], [True, False]]
    assert await _admitted(limiter, "key:k", key, 10) == 3  # 5 - the 2 admitted together
    with pytest.raises(ValueError, match="once per check"):
        await limiter.check_many([("a", key), ("a", ip)])


async def test_the_longer_wait_is_reported_when_both_limits_refuse(
    limiter: MemoryRateLimiter, wall: FakeClock
) -> None:
    policy = LimitPolicy(rate_per_s=0.5, burst=1, daily_quota=1)
    assert (await limiter.check("s", policy)).allowed
    refused = await limiter.check("s", policy)
    assert refused.limit_name == "daily"
    assert refused.retry_after_s == pytest.approx(12 * 3600.0)  # noon to midnight, not 2 s


async def test_concurrent_tasks_admit_exactly_the_burst(limiter: MemoryRateLimiter) -> None:
    policy = LimitPolicy(rate_per_s=0.001, burst=50)
    decisions = await asyncio.gather(*(limiter.check("s", policy) for _ in range(400)))
    assert sum(d.allowed for d in decisions) == 50


async def test_cost_counts_several_units(limiter: MemoryRateLimiter) -> None:
    policy = LimitPolicy(rate_per_s=0.001, burst=10, daily_quota=100)
    first = await limiter.check("s", policy, cost=4)
    assert first.allowed and first.remaining == 6
    assert (await limiter.check("s", policy, cost=4)).allowed
    refused = await limiter.check("s", policy, cost=4)
    assert not refused.allowed and refused.remaining == 2
    assert (await limiter.check("s", policy, cost=2)).allowed
    with pytest.raises(ValueError, match="cost"):
        await limiter.check("s", policy, cost=0)


def test_policy_header_follows_the_draft_syntax() -> None:
    assert (
        policy_header(LimitPolicy(10.0, 20, 10_000)) == '"burst";q=20;w=2, "daily";q=10000;w=86400'
    )
    assert policy_header(LimitPolicy(3.0, 10)) == '"burst";q=10;w=4'  # 10/3 s, rounded up
    assert policy_header(LimitPolicy(100.0, 1)) == '"burst";q=1;w=1'  # never below 1 s


async def test_headers_of_an_admission_and_a_refusal(limiter: MemoryRateLimiter) -> None:
    policy = LimitPolicy(rate_per_s=1.0, burst=3, daily_quota=1000)
    admitted = ratelimit_headers(await limiter.check("s", policy), policy)
    assert admitted == {
        "RateLimit-Policy": '"burst";q=3;w=3, "daily";q=1000;w=86400',
        "RateLimit": '"burst";r=2;t=1',
    }
    await _admitted(limiter, "s", policy, 2)
    refused = ratelimit_headers(await limiter.check("s", policy), policy)
    assert refused["RateLimit"] == '"burst";r=0;t=3'
    assert refused["Retry-After"] == "1"
    item = r'"(burst|daily)";q=\d+;w=\d+'
    assert re.fullmatch(rf"{item}(, {item})*", refused["RateLimit-Policy"])


async def test_memory_is_bounded_by_evicting_the_least_recently_used(
    clock: FakeClock, wall: FakeClock
) -> None:
    limiter = MemoryRateLimiter(clock=clock, wall_clock=wall, max_subjects=3)
    policy = LimitPolicy(rate_per_s=0.001, burst=1)
    for subject in ("a", "b", "c", "a", "d"):  # "a" is touched again, so "b" goes first
        await limiter.check(subject, policy)
    assert len(limiter) == 3
    assert (await limiter.check("b", policy)).allowed  # evicted: starts fresh
    assert not (await limiter.check("a", policy)).allowed  # kept: still limited
    assert len(limiter) == 3
    for index in range(1000):
        await limiter.check(f"ip:{index}", policy)
    assert len(limiter) == 3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rate_per_s": 0.0, "burst": 1}, "rate_per_s"),
        ({"rate_per_s": float("inf"), "burst": 1}, "rate_per_s"),
        ({"rate_per_s": 1.0, "burst": 0}, "burst"),
        ({"rate_per_s": 1.0, "burst": 1, "daily_quota": -1}, "daily_quota"),
    ],
)
def test_policy_rejects_nonsense(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LimitPolicy(**kwargs)  # type: ignore[arg-type]


async def test_memory_limiter_is_always_reachable(limiter: MemoryRateLimiter) -> None:
    assert await limiter.ping()
    await limiter.close()
