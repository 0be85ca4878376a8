"""The private tier's admission budgets as a running part of the server: counters restored at
start, saved every ``persist_interval_s`` and at shutdown (``private_core.admission_store``)."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

from private_core.admission import Admission, AdmissionMetrics
from private_core.admission_store import (
    CounterStore,
    FileCounterStore,
    persist_periodically,
    save_now,
)
from private_core.metrics import PrivateMetrics
from private_core.settings import PrivateSettings
from shared.logs import get_logger

log = get_logger(__name__)


@dataclass
class Budgets:
    """An ``Admission`` and the store its counters outlive the process in."""

    admission: Admission
    store: CounterStore
    interval_s: float
    _task: asyncio.Task[None] | None = field(default=None)

    @classmethod
    def open(cls, settings: PrivateSettings, metrics: PrivateMetrics) -> Budgets:
        """Budgets from the settings, with the counters an earlier process saved today
        (``AdmissionStateError``, logged, when they cannot be read)."""
        budgets = settings.admission
        admission = Admission(budgets, AdmissionMetrics.create(metrics.registry))
        store = FileCounterStore(settings.state_dir)
        restored = store.load()
        admission.restore(restored)
        log.info(
            "private_admission_ready",
            identity=budgets.identity.model_dump(),
            unsigned=budgets.unsigned.model_dump(),
            key=budgets.key.model_dump() if budgets.key else None,
            restored_counters=len(restored),
        )
        return cls(admission, store, budgets.persist_interval_s)

    def start(self) -> None:
        """Save the counters periodically from now on (on the running loop)."""
        self._task = asyncio.create_task(
            persist_periodically(self.admission, self.store, self.interval_s)
        )

    async def close(self) -> None:
        """Stop the periodic saves and save once more."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await save_now(self.admission, self.store)
