"""Sybil key groups on the digits model with the benchmark's clients: a thief spread over ten
keys is grouped, scored as one and refused; benign clients are not grouped; links, merging,
operator orders, the CLI and the Redis address book."""

from __future__ import annotations

import argparse
import heapq
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench.attacks import (
    DAY,
    HOUR,
    Batch,
    BenignClient,
    NaturalAttacker,
    Pacing,
    PerturbationAttacker,
    benign_clients,
)
from public_api.keys import KEYS_DB, SqliteKeyStore
from public_api.monitor import ExtractionMonitor, MonitorConfig
from public_api.monitor.cli import add_monitor_commands, monitor_log_path
from public_api.monitor.group_addresses import MemoryAddressBook, RedisAddressBook
from public_api.monitor.group_links import address_links
from public_api.monitor.group_log import GroupLog, read_groups
from public_api.monitor.group_merge import merge_states
from public_api.monitor.groups import KeyGroups, union_find
from public_api.monitor.state import HOURS, KeyState, ModelState
from tests.support.redis_server import RedisServer, redis_server_fixture
from tests.unit.public_api.test_monitor import (  # the digits world of the monitor's tests
    FRONT_SPECS,
    MODEL,
    Clock,
    World,
    make_monitor,
    seeds,
    world,
)

__all__ = ["world"]  # a fixture, used by name

redis_server = redis_server_fixture(scope="module")
THIEF_KEYS, THIEF_QUERIES = 10, 2000  # 20,000 queries in all
PASS_EVERY = 2 * HOUR  # simulated time between group passes
THIEF_NET = "2001:db8:7:7::"  # the thief's /64: one address per key in it


@dataclass
class Sim:
    """Clients driven in simulated time through one monitor, with group passes between."""

    world: World
    monitor: ExtractionMonitor
    clock: Clock
    groups: KeyGroups
    served: dict[str, int] = field(default_factory=dict)
    own_levels: dict[str, set[str]] = field(default_factory=dict)
    seen: dict[tuple[str, ...], tuple[str, ...]] = field(default_factory=dict)  # -> links
    thief_at_flag: int | None = None
    thief_at_block: int | None = None

    def thief_queries(self) -> int:
        return sum(n for key, n in self.served.items() if key.startswith("thief-"))

    async def run(self, clients: list[tuple[str, str, Any]]) -> None:
        """Each (key, address, client) until done or refused, a group pass every
        ``PASS_EVERY``; every group any pass formed is in ``seen``."""
        queue: list[tuple[float, int, str, str, Any, Batch]] = []
        for order, (key, address, client) in enumerate(clients):
            if (batch := client.next_batch()) is not None:
                heapq.heappush(queue, (batch.at, order, key, address, client, batch))
        next_pass = PASS_EVERY
        while queue:
            at, order, key, address, client, batch = heapq.heappop(queue)
            while at >= next_pass:
                self.clock.now = 1_700_000_000.0 + next_pass
                await self._pass()
                next_pass += PASS_EVERY
            self.clock.now = 1_700_000_000.0 + at
            if (await self.monitor.current(key)).level == "blocked":
                continue  # refused: the client gets nothing more
            answer = self.world.answer(batch.images)
            own = await self.monitor.observe(
                key,
                MODEL,
                {"image": batch.images},
                self.world.activations(batch.images),
                answer.indices,
                FRONT_SPECS,
            )
            self.groups.note(key, address)
            self.served[key] = self.served.get(key, 0) + len(batch.images)
            if self.thief_at_flag is None:  # the key's own verdict, before any group acted
                self.own_levels.setdefault(key, set()).add(own.level)
            client.receive(batch, answer)
            if (following := client.next_batch()) is not None:
                heapq.heappush(queue, (following.at, order, key, address, client, following))
        await self._pass()

    async def _pass(self) -> None:
        for record in await self.groups.run_once():
            self.seen[record.members] = record.links
            if any(m.startswith("thief-") for m in record.members) and record.level != "ok":
                if self.thief_at_flag is None:
                    self.thief_at_flag = self.thief_queries()
                if record.level == "blocked" and self.thief_at_block is None:
                    self.thief_at_block = self.thief_queries()


def make_sim(world: World, log: GroupLog | None = None) -> Sim:
    monitor, clock = make_monitor(world)
    groups = KeyGroups(monitor, MemoryAddressBook(), log, clock=clock)
    return Sim(world, monitor, clock, groups)


def thief(world: World, index: int) -> NaturalAttacker:
    """One of the thief's keys: natural digits of one class each (so that no key alone covers
    the classes), lightly augmented, 20 every 20 minutes (no burst)."""
    data = world.digits.data
    pool = data.test_x[data.test_y == index]
    pacing = Pacing(THIEF_QUERIES, 20, 20 * 60.0, 2 * DAY, seed=100 + index)
    return NaturalAttacker(pool, pacing, augment_p=0.1)


def benchmark_benign(world: World) -> list[BenignClient]:
    """The benchmark's 120 benign clients (bench/extraction_monitor.py, seed 0)."""
    data = world.digits.data
    return benign_clients(120, data.test_x, data.test_y, seed=4)


async def test_a_thief_spread_over_ten_keys_is_blocked_as_one_group(world: World) -> None:
    sim = make_sim(world)
    benign = benchmark_benign(world)
    clients: list[tuple[str, str, Any]] = [
        (client.name, f"203.0.{i // 200}.{i % 200 + 1}", client) for i, client in enumerate(benign)
    ]
    clients += [(f"thief-{k}", f"{THIEF_NET}{k + 1:x}", thief(world, k)) for k in range(10)]
    await sim.run(clients)

    thieves = {f"thief-{k}" for k in range(THIEF_KEYS)}
    # No thief key alone was flagged before its group was; the group was, then blocked.
    assert all(sim.own_levels[key] == {"ok"} for key in thieves)
    assert sim.thief_at_flag is not None and sim.thief_at_block is not None
    assert sim.thief_at_block < THIEF_KEYS * THIEF_QUERIES
    for key in sorted(thieves):
        current = await sim.monitor.current(key)
        assert current.level == "blocked", key
        assert current.reasons[0].startswith("group g-")
    assert sim.thief_queries() < THIEF_KEYS * THIEF_QUERIES  # refused before the end

    # One group, exactly the thief's keys, linked by its /64; no benign key grouped or flagged.
    assert list(sim.seen) == [tuple(sorted(thieves))]
    assert all(link.endswith(f"/64 {THIEF_NET}/64") for link in sim.seen[tuple(sorted(thieves))])
    for client in benign:
        assert (await sim.monitor.current(client.name)).level == "ok", client.name
    print(
        f"\nthief group flagged at {sim.thief_at_flag:,} and blocked at {sim.thief_at_block:,} "
        f"of {THIEF_KEYS * THIEF_QUERIES:,} queries; 0/{len(benign)} benign keys grouped"
    )


async def test_keys_sharing_a_crafted_distribution_are_grouped(world: World) -> None:
    sim = make_sim(world)
    shared, other = seeds(world), world.digits.data.test_x[-10:]
    clients: list[tuple[str, str, Any]] = [
        (
            f"pert-{k}",
            f"198.51.100.{k + 1}",
            PerturbationAttacker(shared, Pacing(600, 20, 60.0, seed=k)),
        )
        for k in range(4)
    ]
    clients.append(("pert-other", "192.0.2.7", PerturbationAttacker(other, Pacing(600, 20, 60.0))))
    heavy = [c for c in benchmark_benign(world) if c.volume == 400][:4]
    clients += [(c.name, f"203.0.113.{i + 1}", c) for i, c in enumerate(heavy)]
    await sim.run(clients)

    group = tuple(f"pert-{k}" for k in range(4))
    assert list(sim.seen) == [group]  # not the other seeds' key, no natural client
    assert all(": distribution digits (mixing " in link for link in sim.seen[group])


def test_addresses_terms_and_crowds_link_keys() -> None:
    served = {
        "k_a": {"2001:db8:1:1::5": 1.0},
        "k_b": {"2001:db8:1:1::6": 1.0, "192.0.2.1": 1.0},
        "k_c": {"192.0.2.1": 1.0},
        "k_d": {"192.0.2.2": 1.0},
        "k_e": {"unix:/run/sock": 1.0},
        "k_f": {"unix:/run/sock": 1.0},
    }
    links, crowded = address_links(served, {"k_d": {"198.51.100.9"}, "k_g": {"192.0.2.2"}}, 5)
    assert [(link.a, link.b, link.kind, link.detail) for link in links] == [
        ("k_a", "k_b", "/64", "2001:db8:1:1::/64"),
        ("k_b", "k_c", "address", "192.0.2.1"),
        ("k_d", "k_g", "terms", "192.0.2.2"),
    ]
    assert crowded == []
    assert union_find(served, links) == [["k_a", "k_b", "k_c"]]

    crowd = {f"k_{i}": {"192.0.2.50": 1.0} for i in range(4)}
    links, crowded = address_links(crowd, {}, 3)
    assert (links, crowded) == ([], ["192.0.2.50"])


def test_merged_state_counts_every_member() -> None:
    hour = 400_000
    first, second = ModelState(), ModelState()
    for part, queries, last, labels, cells in (
        (first, 2000, hour, [5, 0, 3], [0b1000_0001]),
        (second, 1000, hour - 2, [0, 7], [0b0100_0000, 0b1]),
    ):
        part.queries, part.repeats, part.analysed, part.ood = queries, 10, queries // 2, 7
        part.space, part.last_hour = "input", last
        part.hours[last % HOURS] = queries
        part.labels = np.array(labels, np.int64)
        part.cells = np.array(cells, np.uint8)
        part.distances = np.full(256, queries, np.float32)
        part.distance_count = queries
    old = ModelState(queries=50, last_hour=hour - HOURS - 1, space="input")
    old.hours[old.last_hour % HOURS] = 50  # more than a week before the latest: not in the ring

    merged = merge_states(
        [KeyState(models={MODEL: s}) for s in (first, second, old)], 256, seed=1
    ).models[MODEL]
    assert (merged.queries, merged.repeats, merged.analysed, merged.ood) == (3050, 20, 1500, 14)
    assert merged.labels.tolist() == [5, 7, 3]
    assert merged.cells.tolist() == [0b1100_0001, 0b1]
    assert (merged.last_hour, int(merged.hours.sum())) == (hour, 3000)
    assert merged.hours[(hour - 2) % HOURS] == 1000
    window = merged.window()
    assert merged.distance_count == 3000 and len(window) == 256
    assert abs(int(np.count_nonzero(window == 2000)) - 171) <= 1  # two thirds from the first


async def test_operator_orders_and_cli(
    world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "public").mkdir()
    path = monitor_log_path(tmp_path)
    # The CLI refuses keys the key store does not hold: the lone key is a real one.
    with closing(SqliteKeyStore(path.parent / KEYS_DB)) as store:
        lone = store.create("lone")[0].key_id
    monitor, clock = make_monitor(world, MonitorConfig())
    groups = KeyGroups(monitor, MemoryAddressBook(), GroupLog(path), clock=clock)
    images = world.digits.data.test_x[:30]
    for key in ("k_aaaaaaa1", "k_aaaaaaa2", lone):
        answer = world.answer(images)
        await monitor.observe(
            key, MODEL, {"image": images}, world.activations(images), answer.indices, FRONT_SPECS
        )
    groups.note("k_aaaaaaa1", "192.0.2.1")
    groups.note("k_aaaaaaa2", "192.0.2.1")
    groups.note(lone, "192.0.2.2")
    (record,) = await groups.run_once()
    assert record.members == ("k_aaaaaaa1", "k_aaaaaaa2") and record.level == "ok"

    parser = argparse.ArgumentParser()
    add_monitor_commands(parser.add_subparsers(dest="command", required=True))

    def cli(*words: str) -> tuple[int, str]:
        args = parser.parse_args(["monitor", *words, "--deploy", str(tmp_path)])
        code = args.run(args)
        return code, capsys.readouterr().out

    code, shown = cli("show", "--groups")
    assert code == 0 and record.group_id in shown
    assert "members: k_aaaaaaa1, k_aaaaaaa2" in shown
    assert "link k_aaaaaaa1 ~ k_aaaaaaa2: address 192.0.2.1" in shown
    assert cli("block", "--group", "g-missing")[0] == 1

    assert cli("block", "--group", record.group_id)[0] == 0
    await groups.run_once()
    for key, level in (("k_aaaaaaa1", "blocked"), ("k_aaaaaaa2", "blocked"), (lone, "ok")):
        assert (await monitor.current(key)).level == level
    assert read_groups(path)[0].group_id == record.group_id

    with pytest.raises(ValueError, match="no API key"):
        cli("throttle", "k_unknown1")
    assert cli("throttle", "--key", "lone")[0] == 0  # by name
    assert cli("clear", "--group", record.group_id)[0] == 0
    await groups.run_once()
    for key, level in (("k_aaaaaaa1", "ok"), ("k_aaaaaaa2", "ok"), (lone, "throttled")):
        assert (await monitor.current(key)).level == level


async def test_redis_address_book_is_shared_by_replicas(redis_server: RedisServer) -> None:
    first = RedisAddressBook(redis_server.url, prefix="test:grp:", max_per_key=2)
    second = RedisAddressBook(redis_server.url, prefix="test:grp:", max_per_key=2)
    try:
        first.note("k_a", "2001:db8::1", 100.0)
        first.note("k_a", "2001:db8::2", 200.0)
        second.note("k_a", "2001:db8::3", 300.0)
        first.note("k_old", "192.0.2.9", 10.0)
        await first.flush()
        await second.flush()
        seen = await first.recent(50.0)
        assert seen == {"k_a": {"2001:db8::2": 200.0, "2001:db8::3": 300.0}}
        assert await second.recent(50.0) == seen  # trimmed to max_per_key in Redis too
        assert [await first.lease(30.0), await second.lease(30.0)] == [True, False]
    finally:
        await first.close()
        await second.close()
