"""The Redis rate limiter against a real redis-server: semantics, exactness across processes,
failing closed (or open) while Redis is down, and recovery when it is back."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio
from structlog.testing import capture_logs

from public_api.ratelimit import LimitPolicy, RedisRateLimiter, ratelimit_headers
from shared.errors import Unavailable
from tests.support.redis_server import RedisServer, redis_server_fixture

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]

redis_server = redis_server_fixture(scope="module")
own_redis = redis_server_fixture(scope="function", name="own_redis")


@pytest.fixture
async def limiter(redis_server: RedisServer) -> AsyncIterator[RedisRateLimiter]:
    limiter = RedisRateLimiter(redis_server.url)
    yield limiter
    await limiter.close()


@pytest.fixture
def subject() -> str:
    return f"key:{uuid.uuid4().hex[:8]}:model:digits"


async def _admitted(limiter: RedisRateLimiter, subject: str, policy: LimitPolicy, n: int) -> int:
    return sum([(await limiter.check(subject, policy)).allowed for _ in range(n)])


# Redis decides with its own clock (TIME), which a test cannot stop. The exact tests use rates
# so slow (one unit per 1000 s) that no stall of the machine refills a unit between two checks,
# and move time forward by editing the stored GCRA state; only the last one waits for real time.
SLOW = 0.001  # units per second


async def test_burst_then_refusal(limiter: RedisRateLimiter, subject: str) -> None:
    policy = LimitPolicy(rate_per_s=SLOW, burst=3)
    started = time.monotonic()
    decisions = [await limiter.check(subject, policy) for _ in range(4)]
    took = time.monotonic() - started  # bounds Redis's own time between the checks
    assert [d.allowed for d in decisions] == [True, True, True, False]
    assert [d.remaining for d in decisions] == [2, 1, 0, 0]
    refused = decisions[3]
    assert refused.limit_name == "burst"
    # A unit refills 1000 s after the first admission; the burst is whole 3000 s after it.
    assert 1000 - took <= refused.retry_after_s <= 1000
    assert 3000 - took <= refused.reset_s <= 3000
    assert 1000 - took <= int(ratelimit_headers(refused, policy)["Retry-After"]) <= 1000


async def test_one_interval_refills_one_unit(
    limiter: RedisRateLimiter, subject: str, redis_server: RedisServer
) -> None:
    policy = LimitPolicy(rate_per_s=SLOW, burst=3)
    assert await _admitted(limiter, subject, policy, 4) == 3
    client = redis.asyncio.Redis.from_url(redis_server.url)
    try:  # one interval passes: the theoretical arrival time moves 1000 s closer
        key = f"splitvault:rl:gcra:{subject}"
        stored = await client.get(key)
        assert stored is not None
        tat = float(stored)
        await client.set(key, f"{tat - 1 / SLOW:.6f}", keepttl=True)
    finally:
        await client.aclose()
    assert await _admitted(limiter, subject, policy, 3) == 1


async def test_the_burst_is_whole_again_after_its_reset(
    limiter: RedisRateLimiter, subject: str
) -> None:
    """Real time: after the reset a decision announced, the whole burst is admitted again (a
    slow machine only lets more time pass, which refills nothing beyond the burst)."""
    policy = LimitPolicy(rate_per_s=10.0, burst=3)
    decisions = [await limiter.check(subject, policy) for _ in range(3)]
    assert all(d.allowed for d in decisions)
    assert 0 < decisions[-1].reset_s <= 0.3
    await asyncio.sleep(decisions[-1].reset_s + 0.01)
    assert await _admitted(limiter, subject, policy, 3) == 3


async def test_daily_quota_and_its_key(
    limiter: RedisRateLimiter, subject: str, redis_server: RedisServer
) -> None:
    policy = LimitPolicy(rate_per_s=SLOW, burst=100, daily_quota=3)
    decisions = [await limiter.check(subject, policy) for _ in range(4)]
    assert [d.allowed for d in decisions] == [True, True, True, False]
    refused = decisions[3]
    assert refused.limit_name == "daily" and refused.remaining == 0
    client = redis.asyncio.Redis.from_url(redis_server.url)
    try:
        seconds, _ = await client.time()
        day, to_midnight = divmod(seconds, 86_400)
        key = f"splitvault:rl:quota:{subject}:{day}"
        assert await client.get(key) == b"3"  # the refused request was not counted
        # Slack of a minute for a stalled machine: a wrong TTL would be off by hours.
        assert 2 * 86_400 - 60 <= await client.ttl(key) <= 2 * 86_400
        # The GCRA state expires when its arrival time has passed: 3 units of 1000 s from now.
        assert 3000_000 - 60_000 <= await client.pttl(f"splitvault:rl:gcra:{subject}") <= 3000_001
    finally:
        await client.aclose()
    assert refused.retry_after_s == pytest.approx(86_400 - to_midnight, abs=60)


async def test_refusals_consume_neither_limit(limiter: RedisRateLimiter, subject: str) -> None:
    rate_only = LimitPolicy(rate_per_s=0.001, burst=3)
    with_quota = LimitPolicy(rate_per_s=0.001, burst=3, daily_quota=1)
    assert await _admitted(limiter, subject, with_quota, 5) == 1
    assert await _admitted(limiter, subject, rate_only, 5) == 2
    other = subject + ":2"
    tight = LimitPolicy(rate_per_s=0.001, burst=1, daily_quota=5)
    loose = LimitPolicy(rate_per_s=0.001, burst=1000, daily_quota=5)
    assert await _admitted(limiter, other, tight, 10) == 1
    assert await _admitted(limiter, other, loose, 10) == 4


async def test_check_many_is_all_or_nothing(limiter: RedisRateLimiter, subject: str) -> None:
    key, ip = LimitPolicy(0.001, burst=5), LimitPolicy(0.001, burst=2)
    checks = [(subject, key), (f"ip:{subject}", ip)]
    verdicts = [[d.allowed for d in await limiter.check_many(checks)] for _ in range(4)]
    assert verdicts == [[True, True], [True, True], [True, False], [True, False]]
    assert await _admitted(limiter, subject, key, 10) == 3


async def test_fractional_rates_survive_the_round_trip(
    limiter: RedisRateLimiter, subject: str
) -> None:
    policy = LimitPolicy(rate_per_s=3.0, burst=7)  # T = 1/3 s is not exact in decimal
    decisions = [await limiter.check(subject, policy) for _ in range(8)]
    assert [d.remaining for d in decisions[:7]] == [6, 5, 4, 3, 2, 1, 0]
    assert not decisions[7].allowed


_WORKER = """
import asyncio, json, random, sys, time
from public_api.ratelimit import LimitPolicy, RedisRateLimiter

async def check(limiter, subject, policy):
    await asyncio.sleep(random.uniform(0, 0.1))  # spread over 100 ms, so both processes mix
    return await limiter.check(subject, policy)

async def main(url, subject, rate, burst, quota, n):
    limiter = RedisRateLimiter(url, timeout_s=10.0)
    policy = LimitPolicy(rate_per_s=rate, burst=burst, daily_quota=quota)
    assert all(await asyncio.gather(*(limiter.ping() for _ in range(64))))  # open the pool
    print("ready", flush=True)
    start_at = float(await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline))
    await asyncio.sleep(start_at - time.time())  # both processes start at the same instant
    decisions = await asyncio.gather(*(check(limiter, subject, policy) for _ in range(n)))
    await limiter.close()
    print(json.dumps(sum(d.allowed for d in decisions)), flush=True)

url, subject, rate, burst, quota, n = sys.argv[1:]
asyncio.run(main(url, subject, float(rate), int(burst), None if quota == "-" else int(quota), int(n)))
"""


def _two_processes(url: str, subject: str, policy: LimitPolicy, each: int) -> list[int]:
    """Start two workers, release them together, and return what each admitted."""
    quota = "-" if policy.daily_quota is None else str(policy.daily_quota)
    argv = [url, subject, repr(policy.rate_per_s), str(policy.burst), quota, str(each)]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=REPO_ROOT,
            env=env,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        for worker in workers:
            assert worker.stdout is not None and worker.stdout.readline().strip() == "ready"
        start_at = time.time() + 0.2
        for worker in workers:
            assert worker.stdin is not None
            worker.stdin.write(f"{start_at!r}\n")
            worker.stdin.flush()
        outputs = [worker.communicate(timeout=60)[0] for worker in workers]
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
    assert all(worker.returncode == 0 for worker in workers)
    return [json.loads(output) for output in outputs]


@pytest.mark.parametrize(
    ("policy", "limit"),
    [
        (LimitPolicy(rate_per_s=0.001, burst=50), 50),
        (LimitPolicy(rate_per_s=0.001, burst=100_000, daily_quota=30), 30),
    ],
    ids=["burst-50", "quota-30"],
)
def test_two_processes_together_admit_exactly_the_limit(
    redis_server: RedisServer, subject: str, policy: LimitPolicy, limit: int
) -> None:
    splits = []
    for attempt in range(5):  # again (fresh subject) if one process took everything
        admitted = _two_processes(redis_server.url, f"{subject}:{attempt}", policy, each=400)
        assert sum(admitted) == limit, admitted  # exact on every attempt, raced or not
        splits.append(admitted)
        if all(count > 0 for count in admitted):
            return
    # Exactness held every time, but one process always finished first: on a machine this
    # loaded the test could not show a race, so it says so instead of passing silently.
    pytest.skip(f"the two processes never overlapped on this loaded machine: {splits}")


async def test_fails_closed_while_redis_is_down_then_recovers(
    own_redis: RedisServer, subject: str
) -> None:
    limiter = RedisRateLimiter(own_redis.url, timeout_s=0.5)
    policy = LimitPolicy(rate_per_s=0.001, burst=3)
    try:
        assert (await limiter.check(subject, policy)).allowed and await limiter.ping()
        own_redis.stop()
        started = time.monotonic()
        with pytest.raises(Unavailable, match="rate limit store unavailable") as caught:
            await limiter.check(subject, policy)
        assert caught.value.retry_after_s == 1
        # Does not hang: a refused connection fails at once, at worst after the 0.5 s timeout;
        # 5 s (ten times that) leaves room for a loaded machine.
        assert time.monotonic() - started < 5.0
        assert not await limiter.ping()
        own_redis.start()  # same port, empty: the state was not persisted
        assert await limiter.ping()
        assert await _admitted(limiter, subject, policy, 5) == 3  # the script is loaded again
    finally:
        await limiter.close()


async def test_fail_open_admits_while_redis_is_down(own_redis: RedisServer, subject: str) -> None:
    limiter = RedisRateLimiter(own_redis.url, fail_open=True, timeout_s=0.5)
    policy = LimitPolicy(rate_per_s=0.001, burst=1)
    try:
        assert (await limiter.check(subject, policy)).allowed
        assert not (await limiter.check(subject, policy)).allowed  # limited while Redis is up
        own_redis.stop()
        with capture_logs() as logs:
            assert await _admitted(limiter, subject, policy, 3) == 3  # unlimited, with a warning
            own_redis.start()
            assert await _admitted(limiter, subject, policy, 3) == 1  # limited again
        events = [(entry["event"], entry["log_level"]) for entry in logs]
        # One warning for the outage (not one per request), one note when it ends.
        assert events == [
            ("ratelimit_store_unavailable", "warning"),
            ("ratelimit_store_recovered", "info"),
        ]
        assert logs[0]["fail_open"] is True
    finally:
        await limiter.close()


async def test_unreachable_redis_times_out_quickly() -> None:
    # 192.0.2.0/24 (TEST-NET-1) is never routed: the connect hangs until the timeout.
    limiter = RedisRateLimiter("redis://192.0.2.1:6379/0", timeout_s=0.3)
    started = time.monotonic()
    try:
        with pytest.raises(Unavailable):
            await limiter.check("s", LimitPolicy(1.0, 1))
    finally:
        await limiter.close()
    assert time.monotonic() - started < 1.5
