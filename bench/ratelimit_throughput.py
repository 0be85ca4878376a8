"""Rate-limit decisions per second for each backend (in-memory, Redis), side by side.

A few concurrent callers in one process check subjects as fast as they can for a fixed time;
each check is one GCRA + daily-quota decision. Without ``--redis-url`` a throwaway
``redis-server`` is started on a free port (as the tests do).

Run from the repository root:  .venv/bin/python bench/ratelimit_throughput.py --seconds 3
"""

# ruff: noqa: E402 - the repository root goes on sys.path before the project imports.
from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import argparse
import asyncio
import statistics
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass

from redis.asyncio import Redis

from public_api.ratelimit import LimitPolicy, MemoryRateLimiter, RateLimiter, RedisRateLimiter
from tests.support.redis_server import RedisServer

# Generous limits: nearly every check is admitted, so each one also writes its state.
POLICY = LimitPolicy(rate_per_s=1e6, burst=1_000_000, daily_quota=1_000_000_000)


@dataclass(frozen=True)
class Result:
    """One backend's run."""

    backend: str
    decisions: int
    seconds: float
    latencies_s: list[float]

    @property
    def per_second(self) -> float:
        return self.decisions / self.seconds

    def percentile_us(self, q: float) -> float:
        ordered = sorted(self.latencies_s)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e6


async def _caller(limiter: RateLimiter, index: int, subjects: int, until: float) -> list[float]:
    latencies: list[float] = []
    count = 0
    while (start := time.perf_counter()) < until:
        subject = f"key:k_{(index * 7919 + count) % subjects}:model:digits"
        await limiter.check(subject, POLICY)
        latencies.append(time.perf_counter() - start)
        count += 1
    return latencies


async def measure(name: str, limiter: RateLimiter, args: argparse.Namespace) -> Result:
    """Warm up, then run ``args.callers`` callers for ``args.seconds``."""
    await asyncio.gather(*(limiter.check(f"warm:{i}", POLICY) for i in range(args.callers)))
    started = time.perf_counter()
    until = started + args.seconds
    runs = await asyncio.gather(
        *(_caller(limiter, i, args.subjects, until) for i in range(args.callers))
    )
    elapsed = time.perf_counter() - started
    await limiter.close()
    latencies = [value for run in runs for value in run]
    return Result(name, len(latencies), elapsed, latencies)


def _print(results: list[Result], args: argparse.Namespace) -> None:
    print(
        f"{args.callers} concurrent callers, {args.subjects} subjects, {args.seconds:g} s each, "
        "one process (GCRA + daily quota per decision)"
    )
    print(f"{'backend':<8} {'decisions/s':>12} {'p50 us':>8} {'p99 us':>8} {'mean us':>8}")
    for result in results:
        mean_us = statistics.fmean(result.latencies_s) * 1e6
        print(
            f"{result.backend:<8} {result.per_second:>12,.0f} {result.percentile_us(0.5):>8.0f} "
            f"{result.percentile_us(0.99):>8.0f} {mean_us:>8.0f}"
        )


async def _script_cost_us(redis_url: str) -> float:
    """Redis's own time per decision (the script), from INFO commandstats."""
    client = Redis.from_url(redis_url)
    try:
        stats = await client.info("commandstats")
    finally:
        await client.aclose()
    return float(stats.get("cmdstat_evalsha", {}).get("usec_per_call", float("nan")))


async def _run(args: argparse.Namespace, redis_url: str) -> tuple[list[Result], float]:
    memory = await measure("memory", MemoryRateLimiter(), args)
    redis = await measure("redis", RedisRateLimiter(redis_url, timeout_s=5.0), args)
    return [memory, redis], await _script_cost_us(redis_url)


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, start Redis if needed, measure both backends and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=3.0, help="run time per backend")
    parser.add_argument("--callers", type=int, default=8, help="concurrent callers")
    parser.add_argument("--subjects", type=int, default=1000, help="distinct subjects")
    parser.add_argument("--redis-url", help="an existing Redis (default: start one)")
    args = parser.parse_args(argv)
    with ExitStack() as stack:
        url = args.redis_url
        if url is None:
            directory = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            url = stack.enter_context(RedisServer(directory)).url
        results, script_us = asyncio.run(_run(args, url))
    _print(results, args)
    print(
        f"redis server time per decision (Lua script): {script_us:.1f} us, so one Redis core "
        f"serves about {1e6 / script_us:,.0f} decisions/s shared by all replicas"
    )


if __name__ == "__main__":
    main()
