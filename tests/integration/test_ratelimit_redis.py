"""The Redis rate limiter against a real redis-server: semantics, exactness across processes,
failing closed (or open) while Redis is down, and recovery when it is back."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
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


async def test_a_cost_counts_samples_in_the_burst_and_the_quota(
    limiter: RedisRateLimiter, subject: str
) -> None:
    """The public tier charges one unit per sample: the script takes the cost as one check."""
    policy = LimitPolicy(rate_per_s=0.001, burst=64, daily_quota=100)
    full = await limiter.check(subject, policy, cost=64)
    assert full.allowed and full.remaining == 0
    refused = await limiter.check(subject, policy, cost=2)
    assert not refused.allowed and refused.limit_name == "burst"
    quota, daily = f"{subject}:quota", LimitPolicy(rate_per_s=0.001, burst=1000, daily_quota=100)
    assert [(await limiter.check(quota, daily, cost=n)).allowed for n in (60, 41, 40)] == [
        True,
        False,  # 101 > 100: refused by the quota, and nothing counted
        True,
    ]
    ip = LimitPolicy(rate_per_s=0.001, burst=12)
    both = await limiter.check_many([(f"{subject}:k", policy), (f"ip:{subject}", ip)], cost=8)
    assert [d.allowed for d in both] == [True, True]
    again = await limiter.check_many([(f"{subject}:k", policy), (f"ip:{subject}", ip)], cost=8)
    assert [d.allowed for d in again] == [True, False]  # the address has 4 samples left
    left = await limiter.check(f"{subject}:k", policy, cost=56)
    assert left.allowed and left.remaining == 0  # the refused 8 took nothing from the key


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
import asyncio, json, sys
from public_api.ratelimit import LimitPolicy, RedisRateLimiter

async def main(url, subject, rate, burst, quota):
    limiter = RedisRateLimiter(url, timeout_s=10.0)
    policy = LimitPolicy(rate_per_s=rate, burst=burst, daily_quota=quota)
    assert all(await asyncio.gather(*(limiter.ping() for _ in range(64))))  # open the pool
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    # Each line from the parent is a round: that many checks at once; the reply is how many
    # were admitted. The parent releases both workers' rounds together.
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        decisions = await asyncio.gather(
            *(limiter.check(subject, policy) for _ in range(int(line)))
        )
        print(json.dumps(sum(d.allowed for d in decisions)), flush=True)
    await limiter.close()

url, subject, rate, burst, quota = sys.argv[1:]
asyncio.run(main(url, subject, float(rate), int(burst), None if quota == "-" else int(quota)))
"""


def _two_processes(
    url: str, subject: str, policy: LimitPolicy, rounds: int, each: int
) -> list[int]:
    """Two workers checking ``subject`` in lockstep rounds of ``each`` concurrent checks apiece;
    returns what each admitted in all."""
    quota = "-" if policy.daily_quota is None else str(policy.daily_quota)
    argv = [url, subject, repr(policy.rate_per_s), str(policy.burst), quota]
    # The repository for the import, after the connect guard already on PYTHONPATH.
    paths = [os.environ.get("PYTHONPATH", ""), str(REPO_ROOT)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, paths))}
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
    admitted = [0, 0]
    try:
        for worker in workers:
            assert worker.stdout is not None and worker.stdout.readline().strip() == "ready"
        for _ in range(rounds):
            for worker in workers:  # both rounds are in flight before either is read
                assert worker.stdin is not None
                worker.stdin.write(f"{each}\n")
                worker.stdin.flush()
            for index, worker in enumerate(workers):
                assert worker.stdout is not None
                admitted[index] += json.loads(worker.stdout.readline())
        for worker in workers:
            assert worker.stdin is not None
            worker.stdin.close()
            worker.wait(timeout=60)
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
            for stream in (worker.stdin, worker.stdout):
                if stream is not None and not stream.closed:
                    stream.close()
    assert all(worker.returncode == 0 for worker in workers)
    return admitted


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
    # 20 rounds of 10 concurrent checks from each process: the first round alone (20 checks)
    # is below either limit, so both processes are admitted some whatever the scheduling, and
    # every later round races the two over the last units. No refill: 0.001 per second.
    admitted = _two_processes(redis_server.url, subject, policy, rounds=20, each=10)
    assert sum(admitted) == limit, admitted
    assert all(count >= 10 for count in admitted), admitted


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


@pytest.fixture
def silent_redis() -> Iterator[str]:
    """A Redis URL whose loopback port accepts connections and never answers: the kernel
    completes the handshake into the backlog, nobody reads or writes."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        yield f"redis://127.0.0.1:{server.getsockname()[1]}/0"


@pytest.fixture
def refusing_redis() -> Iterator[str]:
    """A Redis URL whose loopback port is bound but not listening, so every connect is refused
    at once; the port stays held, so nothing else can start listening there meanwhile."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("127.0.0.1", 0))
        yield f"redis://127.0.0.1:{held.getsockname()[1]}/0"


# "Does not hang" bounds: a check makes at most two attempts of timeout_s each (0.6 s on a quiet
# machine); 6 s is 10x that, so only a hang, not a slow host, fails them.
HANG_BOUND_S = 6.0


@pytest.mark.parametrize("fail_open", [False, True])
async def test_redis_that_never_answers_fails_within_its_timeout(
    silent_redis: str, fail_open: bool
) -> None:
    limiter = RedisRateLimiter(silent_redis, timeout_s=0.3, fail_open=fail_open)
    started = time.monotonic()
    try:
        if fail_open:
            assert (await limiter.check("s", LimitPolicy(1.0, 1))).allowed
        else:
            with pytest.raises(Unavailable):
                await limiter.check("s", LimitPolicy(1.0, 1))
    finally:
        await limiter.close()
    assert time.monotonic() - started < HANG_BOUND_S


async def test_redis_that_refuses_fails_closed(refusing_redis: str) -> None:
    limiter = RedisRateLimiter(refusing_redis, timeout_s=0.3)
    started = time.monotonic()
    try:
        with pytest.raises(Unavailable):
            await limiter.check("s", LimitPolicy(1.0, 1))
    finally:
        await limiter.close()
    assert time.monotonic() - started < HANG_BOUND_S
