"""The private tier's admission budgets as a running part of the server.

``Budgets``: one replica's counters, restored at start, saved every ``persist_interval_s`` and
at shutdown (``private_core.admission_store``). With a private store configured
(``state_store.redis_url``), ``open_budgets`` gives ``RedisBudgets`` instead: counters shared by
every private replica (``private_core.private_redis_budgets``). Both are a ``BudgetGate``.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Protocol

from private_core.admission import Admission, AdmissionMetrics, Caller
from private_core.admission_store import (
    CounterStore,
    FileCounterStore,
    persist_periodically,
    save_now,
)
from private_core.metrics import PrivateMetrics
from private_core.private_redis import StoreHealth, async_client
from private_core.private_redis_budgets import RedisBudgets
from private_core.settings import PrivateSettings
from shared.logs import get_logger

log = get_logger(__name__)


class BudgetGate(Protocol):
    """What the runner counts each call against before it is batched."""

    admission: Admission

    async def admit(self, caller: Caller, model: str, samples: int) -> None:
        """Count ``samples`` rows of ``model`` for ``caller``, or raise without counting any."""
        ...

    def start(self) -> None:
        """Begin any background work (on the running loop)."""
        ...

    async def close(self) -> None:
        """Stop it, keeping what must be kept."""
        ...


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
        admission = _admission(settings, metrics)
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

    async def admit(self, caller: Caller, model: str, samples: int) -> None:
        """Count the call in this replica's counters (never awaits)."""
        self.admission.admit(caller, model, samples)

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


def open_budgets(settings: PrivateSettings, metrics: PrivateMetrics) -> BudgetGate:
    """The private store's shared budgets when one is configured, else this replica's own."""
    store = settings.state_store
    if store.redis_url is None:
        return Budgets.open(settings, metrics)
    log.info(
        "private_admission_ready",
        identity=settings.admission.identity.model_dump(),
        unsigned=settings.admission.unsigned.model_dump(),
        key=settings.admission.key.model_dump() if settings.admission.key else None,
        shared=True,
    )
    return RedisBudgets(
        _admission(settings, metrics),
        async_client(store),
        prefix=store.prefix,
        timeout_s=store.timeout_s,
        health=StoreHealth(),
    )


def _admission(settings: PrivateSettings, metrics: PrivateMetrics) -> Admission:
    return Admission(settings.admission, AdmissionMetrics.create(metrics.registry))
