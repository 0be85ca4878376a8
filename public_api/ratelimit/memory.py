"""The embedded rate limiter: GCRA and daily quotas in this process's memory."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

from shared.gcra import CounterState, Decision, LimitPolicy, check_states

Clock = Callable[[], float]


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
        self._states: OrderedDict[str, CounterState] = OrderedDict()

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
        _no_duplicates(checks)
        decisions, updates = check_states(
            [(self._states.get(subject), policy) for subject, policy in checks],
            cost,
            self._clock(),
            self._wall_clock(),
        )
        if all(decision.allowed for decision in decisions):
            for (subject, _), new_state in zip(checks, updates, strict=True):
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
