"""Refusals counted, not recorded one by one: one audit record per kind per interval.

Refusals that cannot be attributed to an API key (no key, or a wrong one) would let anyone fill
the trail, so they are counted instead (``AuditTrail.tally``): one record per address, model,
decision and status per ``aggregate_s`` seconds, with ``count`` the number of requests it
stands for and ``time`` the first of them. ``count`` enters the hash only when it is not 1, so
records written before the field existed still verify.

"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from dataclasses import dataclass

from public_api.audit import AuditRecord


@dataclass(frozen=True)
class Tallied:
    """What refusals counted together share: one record per distinct value per interval."""

    client: str
    model: str | None
    decision: str
    status: int
    key_id: str | None = None


OTHER_CLIENTS = "(other addresses)"  # where counts go once ``max_entries`` addresses are open


class RefusalTally:
    """Counts of refusals, turned into one ``AuditRecord`` per ``Tallied`` per ``interval_s``.

    An entry's interval starts with its first refusal. At most ``max_entries`` entries are open
    at once; beyond that, new addresses are counted under ``OTHER_CLIENTS``. Thread-safe.
    """

    def __init__(self, interval_s: float, max_entries: int = 10_000) -> None:
        if interval_s <= 0 or max_entries < 1:
            raise ValueError("interval_s must be positive and max_entries at least 1")
        self.interval_s = interval_s
        self._max_entries = max_entries
        self._open: OrderedDict[Tallied, list[float]] = OrderedDict()  # -> [first time, count]
        self._lock = threading.Lock()

    def add(self, what: Tallied, now: float) -> None:
        """Count one refusal at wall-clock time ``now``."""
        with self._lock:
            if what not in self._open and len(self._open) >= self._max_entries:
                what = Tallied(OTHER_CLIENTS, what.model, what.decision, what.status)
            entry = self._open.setdefault(what, [now, 0])
            entry[1] += 1

    def due(self, now: float) -> list[AuditRecord]:
        """The records of every interval that has ended by ``now`` (entries open longest first)."""
        with self._lock:
            ended = []
            while self._open:
                what, (first, _) = next(iter(self._open.items()))
                if first + self.interval_s > now:
                    break
                ended.append((what, self._open.popitem(last=False)[1]))
        return [_tallied_record(what, first, int(count)) for what, (first, count) in ended]

    def drain(self) -> list[AuditRecord]:
        """The records of every open interval, ended now."""
        return self.due(math.inf)


def _tallied_record(what: Tallied, first: float, count: int) -> AuditRecord:
    return AuditRecord(
        time=first,
        key_id=what.key_id,
        client=what.client,
        model=what.model,
        input_sha256=None,
        answer=None,
        decision=what.decision,
        status=what.status,
        count=count,
    )
