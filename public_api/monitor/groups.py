"""Sybil key groups: keys that look like one client are scored, and acted on, together.

A thief can spread its queries over many API keys so that none of them alone looks like
extraction. Every ``interval_s`` seconds a pass over the keys served in the last ``window_s``
seconds links keys by shared evidence (``group_links``: address, /64, terms-acceptance
address, crafted query distribution), unites the links into groups (union-find), merges each
group's monitor states (``group_merge``) and scores the merged state as the monitor scores a
key. A group that reaches flagged, throttled or blocked raises every member to that level
through ``ExtractionMonitor.escalate``, so the gate refuses or throttles them as it would a key
of its own. Per request, only the client address is noted (in memory).

The operator's orders (``splitvault monitor block|throttle|clear --group``) are taken at the
start of each pass. With Redis, one replica per interval runs the pass (a lease in Redis).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from public_api.monitor.group_addresses import AddressBook
from public_api.monitor.group_links import Link, address_links, crafted, distribution_links
from public_api.monitor.group_log import GroupLog, GroupRecord, Order
from public_api.monitor.group_merge import merge_states
from public_api.monitor.monitor import ExtractionMonitor
from public_api.monitor.state import KeyState, key_state_from_bytes
from public_api.monitor.store import LEVELS, Level
from shared.errors import Unavailable
from shared.logs import get_logger

__all__ = ["GroupConfig", "KeyGroups", "union_find"]

log = get_logger(__name__)


@dataclass(frozen=True)
class GroupConfig:
    """How often groups are formed, over which keys, and how alike a distribution must be.

    ``mixing_threshold`` 0.5: two keys whose crafted queries come from one source score about
    1, two sources near 0 (see ``group_links.mixing``). ``crowd``: an address or /64 shared by
    more keys than this links none of them (a proxy or carrier NAT, not one client).
    """

    interval_s: float = 30.0
    window_s: float = 7 * 86400.0
    mixing_threshold: float = 0.5
    min_points: int = 64
    crowd: int = 50
    terms_cache_s: float = 600.0


TermsAddresses = Callable[[str], list[str]]  # key id -> addresses its terms were accepted from


class KeyGroups:
    """Forms key groups periodically and applies their verdicts (see the module docstring)."""

    def __init__(
        self,
        monitor: ExtractionMonitor,
        book: AddressBook,
        log_: GroupLog | None = None,
        *,
        config: GroupConfig | None = None,
        terms_addresses: TermsAddresses | None = None,
        on_assessed: Callable[[str, float], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config or GroupConfig()
        self._monitor, self._book, self._log = monitor, book, log_
        self._terms_addresses, self._on_assessed = terms_addresses, on_assessed
        self._clock = clock
        self._terms: dict[str, tuple[float, set[str]]] = {}
        self._levels: dict[str, Level] = {}
        self._task: asyncio.Task[None] | None = None

    def note(self, key_id: str, address: str) -> None:
        """Record that ``key_id`` was served from ``address`` (the only per-request work)."""
        self._book.note(key_id, address, self._clock())

    async def start(self) -> None:
        """Run a pass every ``interval_s`` seconds in the background until ``close``."""
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="key-groups")

    async def close(self) -> None:
        """Stop the background passes and release the address book."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._book.close()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.interval_s)
            try:
                if await self._book.lease(self.config.interval_s * 0.9):
                    await self.run_once()
            except Unavailable as error:
                log.error("monitor_group_pass_failed", reason=error.message)
            except Exception as error:  # a failed pass must not end the loop
                log.exception("monitor_group_pass_failed", reason=str(error)[:200])

    async def run_once(self) -> list[GroupRecord]:
        """One pass: the operator's orders, then groups formed, scored, applied and saved."""
        await self._book.flush()
        if self._log is not None:
            for order in await self._log.take_orders():
                await self.apply_order(order)
        now = self._clock()
        served = await self._book.recent(now - self.config.window_s)
        states = await self._states(served)
        links = await self._links(served, states, now)
        records = []
        for members in union_find(served, links):
            records.append(await self._judge(members, links, states, now))
        if self._log is not None:
            await self._log.save(records)
        return records

    async def apply_order(self, order: Order) -> None:
        """Block, throttle or clear ``order.members`` as an operator asked."""
        reason = f"operator: {order.action} {order.target}"
        for key_id in order.members:
            if order.action == "clear":
                await self._monitor.clear(key_id)
            else:
                level: Level = "blocked" if order.action == "block" else "throttled"
                await self._monitor.escalate(key_id, level, 0.0, [reason], force=True)
        self._levels.pop(order.target, None)
        log.warning(
            f"monitor_group_operator_{order.action}", target=order.target, members=order.members
        )

    async def _states(self, served: Mapping[str, object]) -> dict[str, KeyState]:
        states = {}
        for key_id in served:
            data = await self._monitor.state_bytes(key_id)
            if data is None:
                continue
            try:
                states[key_id] = key_state_from_bytes(data)
            except (ValueError, KeyError) as error:
                log.error("monitor_state_unreadable", key_id=key_id, error=str(error)[:200])
        return states

    async def _links(
        self, served: Mapping[str, Mapping[str, float]], states: Mapping[str, KeyState], now: float
    ) -> list[Link]:
        terms = {key_id: await self._terms_of(key_id, now) for key_id in served}
        links, crowded = address_links(served, terms, self.config.crowd)
        if crowded:
            log.info("monitor_group_crowded_addresses", subjects=crowded[:20], count=len(crowded))
        suspects = {
            key_id: {
                model: model_state
                for model, model_state in state.models.items()
                if crafted(model_state, self._monitor.config)
            }
            for key_id, state in states.items()
        }
        suspects = {key_id: models for key_id, models in suspects.items() if models}
        threshold, points = self.config.mixing_threshold, self.config.min_points
        found = await asyncio.to_thread(distribution_links, suspects, threshold, points)
        return links + found

    async def _terms_of(self, key_id: str, now: float) -> set[str]:
        if self._terms_addresses is None:
            return set()
        cached = self._terms.get(key_id)
        if cached is None or now - cached[0] > self.config.terms_cache_s:
            addresses = await asyncio.to_thread(self._terms_addresses, key_id)
            cached = (now, set(addresses))
            self._terms[key_id] = cached
        return cached[1]

    async def _judge(
        self,
        members: Sequence[str],
        links: Sequence[Link],
        states: Mapping[str, KeyState],
        now: float,
    ) -> GroupRecord:
        group_id = group_id_of(members)
        config = self._monitor.config
        merged = merge_states(
            [states[m] for m in members if m in states],
            config.distance_reservoir,
            seed=int(group_id[2:], 16),
        )
        score, reasons, level = await asyncio.to_thread(self._monitor.judge, merged, now)
        ours = [link.describe() for link in links if link.a in members]
        record = GroupRecord(
            group_id, tuple(members), tuple(ours), score, level, tuple(reasons), merged.queries, now
        )
        await self._apply(record)
        return record

    async def _apply(self, group: GroupRecord) -> None:
        previous = self._levels.get(group.group_id, "ok")
        self._levels[group.group_id] = group.level
        if group.level == "ok":
            return
        reasons = [f"group {group.group_id} ({len(group.members)} keys): {group.score:.2f}"]
        reasons += [f"group: {reason}" for reason in group.reasons]
        for key_id in group.members:
            changed = await self._monitor.escalate(key_id, group.level, group.score, reasons)
            if changed is not None and self._on_assessed is not None:
                self._on_assessed(key_id, changed.score)
        if LEVELS.index(group.level) > LEVELS.index(previous):
            log.warning(
                f"monitor_group_{group.level}",
                group_id=group.group_id,
                members=list(group.members),
                score=round(group.score, 3),
                queries=group.queries,
                links=list(group.links[:10]),
                link_count=len(group.links),
                reasons=list(group.reasons),
            )


def group_id_of(members: Iterable[str]) -> str:
    """A group's name, stable while its lowest key id stays in it."""
    return "g-" + hashlib.blake2b(min(members).encode(), digest_size=5).hexdigest()


def union_find(keys: Iterable[str], links: Iterable[Link]) -> list[list[str]]:
    """The connected components of ``links`` over ``keys`` with two or more keys, sorted."""
    parent = {key: key for key in keys}

    def root(key: str) -> str:
        while parent[key] != key:
            parent[key] = parent[parent[key]]
            key = parent[key]
        return key

    for link in links:
        if link.a in parent and link.b in parent:
            first, second = sorted((root(link.a), root(link.b)))
            parent[second] = first
    components: dict[str, list[str]] = {}
    for key in sorted(parent):
        components.setdefault(root(key), []).append(key)
    return sorted((c for c in components.values() if len(c) > 1), key=lambda c: c[0])
