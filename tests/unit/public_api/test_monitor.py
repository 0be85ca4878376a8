"""The extraction monitor on the digits model: attack streams are caught, benign ones are not,
state stays bounded, and the stores (memory, Redis, the SQLite log) round-trip."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import structlog
import torch
from structlog.testing import capture_logs

from bench.attacks import (
    Answer,
    Batch,
    BenignClient,
    JacobianAttacker,
    NaturalAttacker,
    Pacing,
    PerturbationAttacker,
    benign_clients,
)
from public_api.keys import KEYS_DB, SqliteKeyStore
from public_api.monitor import (
    Assessment,
    ExtractionMonitor,
    MemoryMonitorStore,
    MonitorConfig,
    MonitorStore,
    RedisMonitorStore,
    ReferenceProfile,
    SqliteAssessmentLog,
    Versioned,
    build_profile,
    features_of,
    load_profile,
    read_assessments,
    save_profile,
)
from public_api.monitor.cli import add_monitor_commands, monitor_log_path
from public_api.monitor.monitor import pick_rows
from public_api.monitor.state import KeyState, key_state_from_bytes, pack, unpack
from shared.errors import Unavailable
from shared.manifest import DimSpec, TensorSpec
from tests.conftest import DigitsFixture
from tests.support.redis_server import RedisServer, redis_server_fixture

redis_server = redis_server_fixture(scope="module")

MODEL = "digits"
FRONT_SPECS = [
    TensorSpec(
        name="relu", datatype="FP32", shape=[DimSpec(name="batch", min=1, max=1024), 16, 8, 8]
    )
]
BUDGET = 2000


@dataclass
class World:
    """The digits model split at its first ReLU (the packed front stage) and its profile."""

    digits: DigitsFixture
    profile: ReferenceProfile

    @property
    def net(self) -> torch.nn.Module:
        return self.digits.spec.module

    def activations(self, images: np.ndarray) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            out = _front(self.net)(torch.from_numpy(images))
        return {"relu": out.numpy().astype(np.float16)}  # as the tier sends them (FP16)

    def answer(self, images: np.ndarray) -> Answer:
        with torch.inference_mode():
            scores, indices = torch.softmax(self.net(torch.from_numpy(images)), 1).topk(3)
        return Answer(indices[:, 0].numpy(), indices.numpy(), scores.numpy())


def _front(net: torch.nn.Module) -> torch.nn.Sequential:
    """The digits CNN's layers up to the split (features.1)."""
    front = net.features[:2]  # type: ignore[index]
    assert isinstance(front, torch.nn.Sequential)
    return front


@pytest.fixture(scope="module")
def world(digits_model: DigitsFixture) -> World:
    with torch.inference_mode():
        out = _front(digits_model.spec.module)(torch.from_numpy(digits_model.data.train_x))
    features = features_of({"relu": out.numpy().astype(np.float16)}, FRONT_SPECS)
    return World(digits_model, build_profile(features))


class Clock:
    """Simulated time for the monitor."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def make_monitor(
    world: World,
    config: MonitorConfig | None = None,
    store: MonitorStore | None = None,
    log: SqliteAssessmentLog | None = None,
) -> tuple[ExtractionMonitor, Clock]:
    clock = Clock()
    monitor = ExtractionMonitor(
        config or MonitorConfig(),
        {MODEL: world.profile},
        store or MemoryMonitorStore(),
        log,
        clock=clock,
    )
    return monitor, clock


@dataclass
class Outcome:
    queries: int = 0
    flagged_at: int | None = None
    blocked_at: int | None = None
    last: Assessment | None = None
    levels: tuple[str, ...] = ()


async def run(
    monitor: ExtractionMonitor, clock: Clock, key: str, client: object, world: World
) -> Outcome:
    """Feed one client's batches through the monitor until it is done or blocked."""
    outcome = Outcome()
    while (batch := client.next_batch()) is not None:  # type: ignore[attr-defined]
        assert isinstance(batch, Batch)
        clock.now = 1_700_000_000.0 + batch.at
        answer = world.answer(batch.images)
        assessment = await monitor.observe(
            key,
            MODEL,
            {"image": batch.images},
            world.activations(batch.images),
            answer.indices,
            FRONT_SPECS,
        )
        client.receive(batch, answer)  # type: ignore[attr-defined]
        outcome.queries += len(batch.images)
        outcome.last = assessment
        outcome.levels += (assessment.level,)
        if assessment.level != "ok" and outcome.flagged_at is None:
            outcome.flagged_at = outcome.queries
        if assessment.level in ("blocked", "throttled"):
            outcome.blocked_at = outcome.queries
            break
    return outcome


def seeds(world: World) -> np.ndarray:
    rng = np.random.default_rng(0)
    test_x = world.digits.data.test_x
    return test_x[rng.choice(len(test_x), 10, replace=False)]


async def test_jacobian_attack_is_flagged_then_blocked(world: World) -> None:
    monitor, clock = make_monitor(world)
    attacker = JacobianAttacker(seeds(world), Pacing(BUDGET, 20, 2.0), substitute_updates=60)
    outcome = await run(monitor, clock, "k_jbda", attacker, world)
    assert outcome.flagged_at is not None and outcome.flagged_at <= 300
    assert outcome.blocked_at is not None and outcome.blocked_at <= BUDGET
    assert outcome.last is not None
    assert any(reason.startswith("PRADA: Shapiro-Wilk W=") for reason in outcome.last.reasons)


async def test_perturbation_attack_is_blocked(world: World) -> None:
    monitor, clock = make_monitor(world)
    attacker = PerturbationAttacker(seeds(world), Pacing(BUDGET, 20, 2.0, seed=2))
    outcome = await run(monitor, clock, "k_noise", attacker, world)
    assert outcome.blocked_at is not None and outcome.blocked_at <= BUDGET


async def test_natural_data_attack_is_blocked(world: World) -> None:
    monitor, clock = make_monitor(world)
    attacker = NaturalAttacker(world.digits.data.test_x, Pacing(BUDGET, 20, 2.0, seed=3))
    outcome = await run(monitor, clock, "k_natural", attacker, world)
    assert outcome.blocked_at is not None and outcome.blocked_at <= BUDGET
    assert outcome.last is not None and outcome.last.level == "blocked"
    assert any(reason.startswith("OOD: ") for reason in outcome.last.reasons)
    assert (await monitor.current("k_natural")).level == "blocked"


async def test_benign_clients_are_not_flagged(world: World) -> None:
    monitor, clock = make_monitor(world)
    data = world.digits.data
    clients: list[BenignClient] = benign_clients(12, data.test_x, data.test_y, seed=4)
    assert max(client.volume for client in clients) == 400
    for client in clients:
        outcome = await run(monitor, clock, client.name, client, world)
        assert outcome.flagged_at is None, (client.name, outcome.last)
        assert outcome.last is not None and outcome.last.score < monitor.config.flag_threshold


async def test_state_stays_bounded(world: World) -> None:
    store = MemoryMonitorStore()
    monitor, clock = make_monitor(world, store=store)
    attacker = NaturalAttacker(world.digits.data.test_x, Pacing(10_000, 100, 1.0, seed=5))
    sizes = {}
    while (batch := attacker.next_batch()) is not None:
        clock.now = batch.at
        assessment = await monitor.observe(
            "k_big",
            MODEL,
            {"image": batch.images},
            world.activations(batch.images),
            world.answer(batch.images).indices,
            FRONT_SPECS,
        )
        attacker.receive(batch, world.answer(batch.images))
        if assessment.queries in (1000, 10_000):
            data = await store.get("k_big")
            assert data is not None
            sizes[assessment.queries] = len(data)
    assert sizes[10_000] <= sizes[1000] + 512
    assert sizes[10_000] < 64 * 1024
    state = key_state_from_bytes(await store.get("k_big") or b"")
    assert state.queries == 10_000  # batches count as their number of queries


def _evenly_spaced(n: int, limit: int) -> np.ndarray:
    """The rows analysed before finding 11: ``limit`` fixed, evenly spaced positions of ``n``."""
    return np.linspace(0, n - 1, limit).round().astype(np.int64)


def test_analysed_rows_are_drawn_with_a_secret_seed_per_request() -> None:
    indices = np.arange(128, dtype=np.int64)
    draws = [pick_rows(indices, 64) for _ in range(200)]
    assert all(len(d) == 64 and len(set(d.tolist())) == 64 for d in draws)
    assert len({d.tobytes() for d in draws}) == len(draws)  # no two requests alike
    # Every row, the ones between the old fixed positions included, is analysed sometimes.
    hidden = np.setdiff1d(indices, _evenly_spaced(128, 64))
    seen = np.unique(np.concatenate(draws))
    assert np.array_equal(seen, indices) and np.isin(hidden, seen).all()
    assert np.array_equal(pick_rows(indices[:50], 64), indices[:50])  # small batch: all rows


async def test_rows_hidden_between_the_analysed_positions_are_analysed(world: World) -> None:
    """Finding 11 replayed: natural rows at the positions analysed before, noise in between."""
    store = MemoryMonitorStore()
    monitor, _ = make_monitor(world, store=store)
    natural = world.digits.data.train_x
    rng = np.random.default_rng(11)
    cover = _evenly_spaced(128, 64)
    for i in range(4):
        batch = rng.uniform(0.0, 1.0, (128, 1, 8, 8)).astype(np.float32)
        batch[cover] = natural[i * 64 : (i + 1) * 64]
        await monitor.observe(
            "k_hider",
            MODEL,
            {"image": batch},
            world.activations(batch),
            world.answer(batch).indices,
            FRONT_SPECS,
        )
    state = key_state_from_bytes(await store.get("k_hider") or b"").models[MODEL]
    assert state.analysed == 4 * 64
    # About half the analysed rows are the hidden noise (all of it lies beyond the reference).
    assert state.ood / state.analysed > 0.3, (state.ood, state.analysed)


class CountingStore(MemoryMonitorStore):
    """The memory store, counting writes; the writes numbered in ``failing`` fail."""

    def __init__(self, failing: frozenset[int] = frozenset()) -> None:
        super().__init__()
        self.puts = 0
        self.failing = failing

    async def swap(self, key_id: str, expected: str | None, data: bytes) -> bool:
        self.puts += 1
        if self.puts in self.failing:
            raise Unavailable("the monitor store is down")
        return await super().swap(key_id, expected, data)


async def _observe_many(monitor: ExtractionMonitor, world: World, count: int) -> list[object]:
    images = world.digits.data.test_x[:count]
    indices = world.answer(images).indices
    assert indices is not None
    return await asyncio.gather(
        *(
            monitor.observe(
                "k_busy",
                MODEL,
                {"image": images[i : i + 1]},
                world.activations(images[i : i + 1]),
                indices[i : i + 1],
                FRONT_SPECS,
            )
            for i in range(count)
        ),
        return_exceptions=True,
    )


async def test_concurrent_requests_of_one_key_share_updates(world: World) -> None:
    store = CountingStore()
    monitor, _ = make_monitor(world, store=store)
    results = await _observe_many(monitor, world, 40)
    assert all(isinstance(result, Assessment) for result in results)
    state = key_state_from_bytes(await store.get("k_busy") or b"")
    assert state.queries == 40  # every request counted once
    assert store.puts < 40  # ...in fewer updates than requests
    assert max(r.queries for r in results if isinstance(r, Assessment)) == 40


async def test_a_failed_update_fails_one_request_and_the_others_retry(world: World) -> None:
    store = CountingStore(failing=frozenset({2}))  # the first update runs alone, the second
    monitor, _ = make_monitor(world, store=store)  # carries every request that waited for it
    results = await _observe_many(monitor, world, 10)
    failed = [result for result in results if isinstance(result, Unavailable)]
    assert len(failed) == 1  # only the caller whose update failed
    state = key_state_from_bytes(await store.get("k_busy") or b"")
    assert state.queries == 9  # its request is not counted; the others were, in a later update
    assert store.puts == 3


class GatedStore(MemoryMonitorStore):
    """The memory store; reads set ``entered``, then wait for ``gate`` (an update held open)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.entered = asyncio.Event()

    async def read(self, key_id: str) -> Versioned | None:
        self.entered.set()
        await self.gate.wait()
        return await super().read(key_id)


async def test_a_caller_that_leaves_while_waiting_is_not_counted(world: World) -> None:
    store = GatedStore()
    monitor, _ = make_monitor(world, store=store)
    images = world.digits.data.test_x[:2]
    indices = world.answer(images).indices
    assert indices is not None

    def observe(i: int) -> asyncio.Task[Assessment]:
        one = images[i : i + 1]
        return asyncio.ensure_future(
            monitor.observe(
                "k_gone",
                MODEL,
                {"image": one},
                world.activations(one),
                indices[i : i + 1],
                FRONT_SPECS,
            )
        )

    first = observe(0)
    async with asyncio.timeout(10):  # does not hang: both steps take milliseconds
        await store.entered.wait()  # the first update is open, waiting on the store
        leaving = observe(1)
        while len(monitor._waiting.get("k_gone", [])) != 1:  # queued behind that update
            await asyncio.sleep(0.001)
    leaving.cancel()
    store.gate.set()
    assert (await first).queries == 1
    with pytest.raises(asyncio.CancelledError):
        await leaving
    later = await observe(0)
    assert later.queries == 2  # the request whose caller left was never counted


async def test_actions(world: World) -> None:
    low = {"flag_threshold": 0.3, "block_threshold": 0.5}
    expected = {
        "record": "flagged",
        "alert": "flagged",
        "throttle": "throttled",
        "block": "blocked",
    }
    for action, top_level in expected.items():
        monitor, clock = make_monitor(world, MonitorConfig(action=action, **low))  # type: ignore[arg-type]
        attacker = NaturalAttacker(world.digits.data.test_x, Pacing(800, 20, 2.0, seed=6))
        with structlog.testing.capture_logs() as events:
            outcome = await run(monitor, clock, "k_act", attacker, world)
        names = {event["event"] for event in events}
        assert top_level in outcome.levels, (action, outcome.levels)
        assert ("extraction_alert" in names) == (action != "record")
        assert ("extraction_blocked" in names) == (action == "block")
        assert ("extraction_throttled" in names) == (action == "throttle")
    # Blocked is sticky until cleared; clearing forgets the key's statistics.
    assert (await monitor.current("k_act")).level == "blocked"
    await monitor.clear("k_act")
    cleared = await monitor.current("k_act")
    assert (cleared.level, cleared.queries, cleared.score) == ("ok", 0, 0.0)


async def test_assessment_log_cli_show_and_clear(
    world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "public").mkdir()
    path = monitor_log_path(tmp_path)
    # The CLI refuses keys the key store does not hold (a name or a typo is no phantom key).
    with closing(SqliteKeyStore(path.parent / KEYS_DB)) as store:
        key_id = store.create("acme")[0].key_id
    log = SqliteAssessmentLog(path)
    monitor, clock = make_monitor(world, MonitorConfig(clear_poll_s=0.0), log=log)
    attacker = NaturalAttacker(world.digits.data.test_x, Pacing(BUDGET, 20, 2.0, seed=3))
    outcome = await run(monitor, clock, key_id, attacker, world)
    assert outcome.blocked_at is not None

    found = read_assessments(path)  # its own connection, as another process would
    assert [(a.key_id, a.level, a.queries) for a in found] == [
        (key_id, "blocked", outcome.blocked_at)
    ]
    assert found[0].reasons == outcome.last.reasons if outcome.last else False

    parser = argparse.ArgumentParser()
    add_monitor_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["monitor", "show", "--deploy", str(tmp_path)])
    assert args.run(args) == 0
    shown = capsys.readouterr().out
    assert key_id in shown and "blocked" in shown and "OOD: " in shown

    args = parser.parse_args(["monitor", "clear", "--deploy", str(tmp_path), "--key", "acmee"])
    with pytest.raises(ValueError, match="no API key with id or name 'acmee'"):
        args.run(args)
    args = parser.parse_args(["monitor", "clear", "--deploy", str(tmp_path), "--key", "acme"])
    assert args.run(args) == 0
    assert (await monitor.current(key_id)).level == "ok"  # the tier picked the request up
    assert read_assessments(path, key_id)[0].level == "ok"


async def test_redis_store_round_trip(world: World, redis_server: RedisServer) -> None:
    store = RedisMonitorStore(redis_server.url, prefix="test:mon:")
    assert await store.swap("k_a", None, b"\x00state")
    found = await store.read("k_a")
    assert found is not None and found.data == b"\x00state"
    assert await store.get("k_a") == b"\x00state"
    assert await store.get("k_missing") is None
    assert "k_a" in await store.keys()
    assert not await store.swap("k_a", None, b"lost")  # it has state now: no blind write
    assert not await store.swap("k_a", "stale", b"lost")
    assert await store.swap("k_a", found.version, b"next")
    assert await store.get("k_a") == b"next"
    await store.reset("k_a", b"cleared")
    assert await store.get("k_a") == b"cleared"

    # Two replicas sharing Redis: a block reached by one is seen by the other.
    other = RedisMonitorStore(redis_server.url, prefix="test:mon:")
    replica_a, clock = make_monitor(world, store=store)
    replica_b, _ = make_monitor(world, store=other)
    attacker = NaturalAttacker(world.digits.data.test_x, Pacing(BUDGET, 20, 2.0, seed=3))
    try:
        outcome = await run(replica_a, clock, "k_shared", attacker, world)
        assert outcome.blocked_at is not None
        assert (await replica_b.current("k_shared")).level == "blocked"
    finally:
        await store.close()
        await other.close()


async def test_redis_store_fails_closed() -> None:
    store = RedisMonitorStore("redis://127.0.0.1:1/0", timeout_s=0.2)
    with pytest.raises(Unavailable):
        await store.get("k_a")
    with pytest.raises(Unavailable):
        await store.swap("k_a", None, b"x")
    with pytest.raises(Unavailable):
        await store.reset("k_a", b"x")
    await store.close()


def test_profile_round_trips_without_pickle(world: World, tmp_path: Path) -> None:
    path = tmp_path / "reference.npz"
    save_profile(world.profile, path)
    loaded = load_profile(path)
    assert path.stat().st_size < 1_000_000
    for name, value in vars(world.profile).items():
        np.testing.assert_array_equal(np.asarray(getattr(loaded, name)), np.asarray(value))
    # An archive holding an object array (which would need pickle) is refused.
    arrays: dict[str, Any] = {
        name: np.asarray(value) for name, value in vars(world.profile).items()
    }
    arrays["mean"] = np.array([{"x": 1}], dtype=object)
    arrays["version"] = np.asarray(1)
    with path.open("wb") as out:
        np.savez(out, **arrays)
    with pytest.raises(ValueError, match="allow_pickle"):
        load_profile(path)


def test_profile_puts_natural_data_inside_and_shifted_data_outside(world: World) -> None:
    data = world.digits.data
    test = features_of(world.activations(data.test_x), FRONT_SPECS)
    shifted = features_of(world.activations(np.roll(data.test_x, 1, axis=3)), FRONT_SPECS)
    threshold = world.profile.ood_threshold
    assert np.mean(world.profile.ood_distances(test) > threshold) < 0.05
    assert np.mean(world.profile.ood_distances(shifted) > threshold) > 0.3


def test_features_of_pools_sequences_and_skips_integers() -> None:
    specs = [
        TensorSpec(
            name="hidden",
            datatype="FP16",
            shape=[DimSpec(name="batch", min=1, max=8), DimSpec(name="seq", min=1, max=16), 4],
        ),
        TensorSpec(
            name="mask",
            datatype="INT64",
            shape=[DimSpec(name="batch", min=1, max=8), DimSpec(name="seq", min=1, max=16)],
        ),
        TensorSpec(
            name="pooled", datatype="FP32", shape=[DimSpec(name="batch", min=1, max=8), 2, 3]
        ),
    ]
    hidden = np.arange(2 * 5 * 4, dtype=np.float16).reshape(2, 5, 4)
    pooled = np.ones((2, 2, 3), np.float32)
    features = features_of(
        {"hidden": hidden, "mask": np.ones((2, 5), np.int64), "pooled": pooled}, specs
    )
    assert features.dtype == np.float32 and features.shape == (2, 4 + 6)
    np.testing.assert_allclose(features[:, :4], hidden.astype(np.float32).mean(axis=1))


def test_state_serialization_has_no_pickle() -> None:
    state = KeyState(level="flagged", score=0.6, reasons=["volume: 1"])
    assert key_state_from_bytes(state.to_bytes()) == state
    _, arrays = unpack(pack({"version": 1}, {"a": np.arange(3)}))
    np.testing.assert_array_equal(arrays["a"], np.arange(3))
    with pytest.raises(ValueError, match="object"):
        unpack(pack({"version": 1}, {"a": np.array([None], dtype=object)}))


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


async def test_an_unwritable_assessment_log_never_fails_the_request(tmp_path: Path) -> None:
    """The log is the operators' view: a failing file (here: replaced by a folder) is logged."""
    path = tmp_path / "monitor.sqlite3"
    assessments = SqliteAssessmentLog(path)
    for leftover in tmp_path.iterdir():
        leftover.unlink()
    path.mkdir()
    with capture_logs() as logs:
        await assessments.record(Assessment("k_00000001", 0.5, "flagged", ("burst",), 3, 1.0))
        assert await assessments.take_clear_requests() == []
    events = [e["event"] for e in logs]
    assert events == ["monitor_log_write_failed", "monitor_log_read_failed"]
