"""Per-call cost of the private tier's shared store against each replica's own state, side by
side: an admission decision (three budgets: identity, unsigned, key) and a nonce record, in
this replica's memory / SQLite file and in a real password-protected ``redis-server`` on a
Unix socket (a private Redis on another node adds its network round trip).

    .venv/bin/python bench/private_store_micro.py [--rounds N] [--calls N]

Rounds interleave the two backends; prints the median microseconds per call of each (wall, and
this process's CPU) and the median of the per-round wall ratios. Figures, never assertions.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from itertools import count
from pathlib import Path

from pydantic import SecretStr

from private_core.admission import Admission, Caller
from private_core.admission_settings import AdmissionSettings, BudgetSettings
from private_core.private_redis import StoreHealth, async_client, sync_client
from private_core.private_redis_budgets import RedisBudgets
from private_core.private_redis_settings import StateStoreSettings
from private_core.private_redis_signatures import RedisSignatureState
from private_core.signers import SIGNATURES_DB, SqliteSignatureState
from tests.support.redis_server import RedisServer

PASSWORD = secrets.token_urlsafe(24)  # a throwaway store, this run only
BIG = BudgetSettings(rate_per_s=1e9, burst=1_000_000, daily_budget=10**12)
CALLER = Caller("splitvault-public-1", key_id="k_bench")


async def _per_call_us(step: Callable[[], Awaitable[None]], calls: int) -> tuple[float, float]:
    """Wall and this process's CPU microseconds per call (the store's own CPU is not counted)."""
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(calls):
        await step()
    return (
        (time.perf_counter() - start) / calls * 1e6,
        (time.process_time() - cpu) / calls * 1e6,
    )


async def _run(rounds: int, calls: int, folder: Path) -> dict[str, list[tuple[float, float]]]:
    settings = AdmissionSettings(identity=BIG, unsigned=BIG, key=BIG)
    with RedisServer(folder / "redis", password=PASSWORD) as server:
        store = StateStoreSettings(redis_url=server.url, password=SecretStr(PASSWORD))
        local = Admission(settings)
        shared = RedisBudgets(
            Admission(settings), async_client(store), prefix="b:", timeout_s=1.0,
            health=StoreHealth(),
        )  # fmt: skip
        sqlite = SqliteSignatureState(folder / SIGNATURES_DB)
        redis_nonces = RedisSignatureState(
            sync_client(store), prefix="b:", window_s=300, health=StoreHealth()
        )
        nonce = count()

        async def admit_local() -> None:
            local.admit(CALLER, "digits", 64)

        async def admit_redis() -> None:
            await shared.admit(CALLER, "digits", 64)

        def nonce_step(
            state: SqliteSignatureState | RedisSignatureState,
        ) -> Callable[[], Awaitable[None]]:
            async def step() -> None:
                now = time.time()
                state.use("k_bench", f"n{next(nonce)}", int(now), forget_before=now - 301)

            return step

        steps = {
            "admission, local": admit_local,
            "admission, private Redis": admit_redis,
            "nonce, SQLite": nonce_step(sqlite),
            "nonce, private Redis": nonce_step(redis_nonces),
        }
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in steps}
        for _ in range(rounds):
            for name, step in steps.items():
                times[name].append(await _per_call_us(step, calls))
        await shared.close()
        redis_nonces.close()
        sqlite.close()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=500)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        times = asyncio.run(_run(args.rounds, args.calls, Path(folder)))
    for name, values in times.items():
        wall = statistics.median(w for w, _ in values)
        cpu = statistics.median(c for _, c in values)
        print(f"{name:28s} median {wall:8.1f} us/call wall, {cpu:8.1f} us/call CPU here")
    for what, local, shared in (
        ("admission", "admission, local", "admission, private Redis"),
        ("nonce", "nonce, SQLite", "nonce, private Redis"),
    ):
        ratios = [s[0] / b[0] for s, b in zip(times[shared], times[local], strict=True)]
        print(f"{what}: Redis / local wall, median of per-round ratios {statistics.median(ratios):.2f}"
              f" (min {min(ratios):.2f}, max {max(ratios):.2f})")  # fmt: skip


if __name__ == "__main__":
    main()
