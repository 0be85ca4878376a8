"""The embedded rate limiter: GCRA and daily quotas in this process's memory."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from public_api.ratelimit._gcra import (
    Decision,
    LimitPolicy,
    burst_verdict,
    check_cost,
    daily_verdict,
    decide,
    utc_day,
)

Clock = Callable[[], float]


@dataclass(slots=True)
class _State:
    tat: float  # on the monotonic clock
    day: int  # UTC day number of ``used``
    used: int


class MemoryRateLimiter:
    """Limits for one process: one event loop, no I/O, bounded memory.

    The state of the ``max_subjects`` most recently seen subjects is kept; older ones are
    evicted (least recently used first) and start fresh if they come back, so a subject idle
    while ``max_subjects`` others were seen may get its daily quota back. Every check runs
    without awaiting, so concurrent tasks on the loop cannot interleave inside one.
    """

    def __init__(
        self,
        clock: Clock = time.monotonic,
        wall_clock: Clock = time.time,
        max_subjects: int = 100_000,
    ) -> None:
        if max_subjects < 1:
            raise ValueError(f"max_subjects must be at least 1, got {max_subjects!r}")
        self._clock = clock
        self._wall_clock = wall_clock
        self._max_subjects = max_subjects
        self._states: OrderedDict[str, _State] = OrderedDict()

    def __len__(self) -> int:
        """How many subjects have state now."""
        return len(self._states)

    async def check(self, subject: str, policy: LimitPolicy, *, cost: int = 1) -> Decision:
        """Admit or refuse one request of ``cost`` units for ``subject``."""
        return (await self.check_many([(subject, policy)], cost=cost))[0]

    async def check_many(
        self, checks: Sequence[tuple[str, LimitPolicy]], *, cost: int = 1
    ) -> list[Decision]:
        """Check several subjects at once; state changes only if every one admits the request."""
        return self._check_now(checks, cost=cost)

    def _check_now(
        self, checks: Sequence[tuple[str, LimitPolicy]], *, cost: int = 1
    ) -> list[Decision]:
        """``check_many`` without a coroutine: nothing in here awaits, so it is atomic."""
        check_cost(cost)
        _no_duplicates(checks)
        now = self._clock()
        day, to_midnight = utc_day(self._wall_clock())
        decisions: list[Decision] = []
        updates: list[tuple[str, _State]] = []
        for subject, policy in checks:
            state = self._states.get(subject)
            tat = state.tat if state is not None else now
            used = state.used if state is not None and state.day == day else 0
            burst, new_tat = burst_verdict(policy, cost, tat, now)
            daily = daily_verdict(policy, cost, used, to_midnight)
            decisions.append(decide(burst, daily))
            updates.append((subject, _State(new_tat, day, used + cost)))
        if all(decision.allowed for decision in decisions):
            for subject, new_state in updates:
                self._states[subject] = new_state
        for subject, _ in checks:
            if subject in self._states:
                self._states.move_to_end(subject)
        while len(self._states) > self._max_subjects:
            self._states.popitem(last=False)
        return decisions

    async def ping(self) -> bool:
        """Always reachable."""
        return True

    async def close(self) -> None:
        """Nothing to release."""


def _no_duplicates(checks: Sequence[tuple[str, LimitPolicy]]) -> None:
    subjects = [subject for subject, _ in checks]
    if len(set(subjects)) != len(subjects):
        raise ValueError(f"each subject may appear once per check, got {subjects!r}")
