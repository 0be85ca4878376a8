"""Phase marks for a lone request's latency breakdown (debug only: off by default, free when off).

With ``enable()`` called (a tier's ``debug_phase_marks`` setting), ``mark(name)`` appends the
system-wide monotonic clock (``CLOCK_MONOTONIC``, which both tiers share on one host) to one
process-wide list, from whichever thread runs the phase; ``flush(event)`` logs every mark since
the last flush as one structured event and clears them. The marks of concurrent requests would
interleave, so a breakdown is only meaningful for requests sent one at a time (c=1), which is
what ``bench/phase_breakdown.py --lone`` does. Off, ``mark`` is one global read and a return.
"""

from __future__ import annotations

import time
from typing import Any

from shared.logs import get_logger

log = get_logger(__name__)
_marks: list[tuple[str, int]] | None = None  # None: marks are off


def enable() -> None:
    """Start recording marks in this process."""
    global _marks
    if _marks is None:
        _marks = []


def enabled() -> bool:
    """Whether marks are recorded in this process."""
    return _marks is not None


def mark(name: str) -> None:
    """Note that phase ``name`` ends now (``list.append`` is atomic, so any thread may mark)."""
    if _marks is not None:
        _marks.append((name, time.monotonic_ns()))


def flush(event: str, **fields: Any) -> None:
    """Log the marks so far as ``event`` (``marks``: [name, nanoseconds] pairs) and clear them."""
    global _marks
    if _marks is None:
        return
    taken, _marks = _marks, []
    log.info(event, marks=[[name, at] for name, at in taken], **fields)
