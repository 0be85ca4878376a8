"""Where the private tier's admission counters outlive the process.

``CounterStore`` is the seam: today a JSON file in the tier's state folder
(``STATE/admission/counters.json``, 0600, replaced atomically), written every
``persist_interval_s`` and at shutdown; a ledger (``private_core/ledger.py``, another branch)
can take its place. A file that exists but cannot be read refuses the start
(``admission_state_unreadable``): budgets that silently restart from zero would fail open.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

from private_core.admission import Admission
from shared.gcra import CounterState
from shared.logs import get_logger
from shared.state_files import FILE_MODE, private_dir

log = get_logger(__name__)
COUNTERS_FILE = Path("admission") / "counters.json"
FORMAT_VERSION = 1


class AdmissionStateError(RuntimeError):
    """The persisted admission counters exist but cannot be read."""


class CounterStore(Protocol):
    """Durable admission counters (``tat`` on the wall clock)."""

    def load(self) -> dict[str, CounterState]:
        """Every stored counter; empty when none was stored yet."""
        ...

    def save(self, counters: Mapping[str, CounterState]) -> None:
        """Replace the stored counters with ``counters``."""
        ...


class FileCounterStore:
    """Counters as one JSON document in the private tier's state folder."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / COUNTERS_FILE

    def load(self) -> dict[str, CounterState]:
        """The stored counters; ``AdmissionStateError`` (logged) when the file is unreadable."""
        if not self.path.exists():
            return {}
        try:
            document = json.loads(self.path.read_text("utf-8"))
            if document.get("version") != FORMAT_VERSION:
                raise ValueError(f"unknown format version {document.get('version')!r}")
            return {
                str(subject): CounterState(float(tat), int(day), int(used))
                for subject, (tat, day, used) in document["counters"].items()
            }
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as error:
            log.error(
                "admission_state_unreadable",
                path=str(self.path),
                reason=f"{type(error).__name__}: {error}",
                hint="restore the file from a backup, or remove it to start today's budgets over",
            )
            raise AdmissionStateError(f"cannot read admission counters in {self.path}") from None

    def save(self, counters: Mapping[str, CounterState]) -> None:
        """Write a temporary file, sync it, then rename it over the old one."""
        document = {
            "version": FORMAT_VERSION,
            "counters": {s: [c.tat, c.day, c.used] for s, c in counters.items()},
        }
        folder = private_dir(self.path.parent)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{self.path.name}.")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                os.fchmod(f.fileno(), FILE_MODE)
                json.dump(document, f, separators=(",", ":"))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


async def save_now(admission: Admission, store: CounterStore) -> bool:
    """Persist a snapshot taken on the event loop, writing it in a thread; False (logged) when
    the write failed: serving goes on, and the next write tries again."""
    snapshot = admission.snapshot()
    try:
        await asyncio.to_thread(store.save, snapshot)
    except OSError as error:
        log.error("admission_state_write_failed", reason=f"{type(error).__name__}: {error}")
        return False
    return True


async def persist_periodically(
    admission: Admission, store: CounterStore, interval_s: float
) -> None:
    """Save the counters every ``interval_s`` until cancelled (shutdown saves once more)."""
    while True:
        await asyncio.sleep(interval_s)
        await save_now(admission, store)
