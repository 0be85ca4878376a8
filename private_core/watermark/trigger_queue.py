"""Trigger records leave the request path: a bounded queue and one writer thread per model.

Every label-watermarked request, marked rows or not, costs its request path the same: one
``submit`` of references to what it already holds (query ids, decisions, answers, inputs),
about a microsecond. Which rows are kept, their encoding, sealing and writing happen in the
writer thread, so a marked answer is not slower than an unmarked one (a timing side channel
``bench/watermark_timing.py`` measures).

Fail closed, as the public tier's audit trail: when the queue holds ``max_rows`` rows or
``max_bytes`` bytes, or the last write failed, ``submit`` raises ``Unavailable`` and the
request is refused (503) rather than answered without its evidence. The writer retries every
``retry_interval_s``; nothing queued is dropped. Repeat counts are written every
``repeat_interval_s`` and on ``close``.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from private_core.watermark.triggers import TriggerLog, TriggerRecord, encode_inputs
from shared.errors import Unavailable
from shared.logs import get_logger

log = get_logger(__name__)
MAX_ROWS = 65_536
MAX_BYTES = 64 << 20


@dataclass(frozen=True)
class PendingRequest:
    """One answered request as the writer needs it (references only, nothing copied)."""

    time: float
    request_id: str
    key_id: str
    ids: list[bytes]
    selected: npt.NDArray[np.bool_]
    top1: npt.NDArray[np.int64]
    answered: npt.NDArray[np.int64]
    inputs: Mapping[str, Any]
    attribution: str = "public"  # how key_id is known (``QueryContext.attribution``)
    signature: Mapping[str, str] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Bytes held while queued (the inputs dominate)."""
        return sum(int(np.asarray(a).nbytes) for a in self.inputs.values()) + 64 * len(self.ids)

    def records(self, model: str) -> list[TriggerRecord]:
        """The trigger records of the marked rows."""
        return [
            TriggerRecord(
                time=self.time,
                model=model,
                query_id=self.ids[row].hex(),
                label=int(self.top1[row]),
                answer=int(self.answered[row]),
                request_id=self.request_id,
                key_id=self.key_id,
                attribution=self.attribution,
                signature=dict(self.signature),
                inputs=encode_inputs({n: np.asarray(a)[row] for n, a in self.inputs.items()}),
            )
            for row in np.flatnonzero(self.selected)
        ]


class TriggerQueue:
    """Queues requests for one model's ``TriggerLog``; a thread seals and writes them."""

    def __init__(
        self,
        store: TriggerLog,
        *,
        max_rows: int = MAX_ROWS,
        max_bytes: int = MAX_BYTES,
        flush_interval_s: float = 0.05,
        repeat_interval_s: float = 1.0,
        retry_interval_s: float = 1.0,
    ) -> None:
        self.store = store
        self._max_rows, self._max_bytes = max_rows, max_bytes
        self._flush_interval_s = flush_interval_s
        self._repeat_interval_s = repeat_interval_s
        self._retry_interval_s = retry_interval_s
        self._queue: deque[PendingRequest] = deque()
        self._rows = self._bytes = 0
        self._submitted = self._written = 0
        self._lock = threading.Lock()
        self._progress = threading.Condition()
        self._wake, self._stop = threading.Event(), threading.Event()
        self._failure: str | None = None
        self._closed = False
        self._thread: threading.Thread | None = None

    @property
    def failure(self) -> str | None:
        """Why the last write failed, or ``None`` while writes succeed."""
        return self._failure

    def submit(self, request: PendingRequest) -> None:
        """Queue ``request``; ``Unavailable`` when full, failing or closed."""
        rows, size = len(request.ids), request.nbytes
        with self._lock:
            if self._closed:
                raise Unavailable("the watermark evidence log is closed")
            if self._failure is not None:
                raise Unavailable(
                    "the private tier cannot keep its watermark evidence", retry_after_s=5.0
                )
            if self._rows + rows > self._max_rows or self._bytes + size > self._max_bytes:
                raise Unavailable("the watermark evidence log is not keeping up", retry_after_s=1.0)
            self._queue.append(request)
            self._rows, self._bytes = self._rows + rows, self._bytes + size
            self._submitted += 1
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name=f"triggers-{self.store.model}", daemon=True
                )
                self._thread.start()

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until every request submitted so far is written, repeats included."""
        target = self._submitted
        deadline = time.monotonic() + timeout
        self._wake.set()
        with self._progress:
            while self._written < target:
                if self._failure is not None:
                    raise Unavailable(f"trigger log cannot write: {self._failure}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"trigger log: {target - self._written} requests unwritten")
                self._progress.wait(remaining)
        self.store.flush_repeats()

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued and the pending repeats, then stop the writer."""
        with self._lock:
            self._closed = True
            thread = self._thread
        self._stop.set()
        self._wake.set()
        if thread is not None:
            thread.join(timeout)
        try:
            self.store.flush_repeats()
        except Unavailable:
            log.error("trigger_repeats_unwritten", model=self.store.model)
        if self._queue:
            log.error(
                "trigger_records_unwritten", model=self.store.model, requests=len(self._queue)
            )

    def _run(self) -> None:
        last_repeats = time.monotonic()
        while True:
            batch = self._take()
            if batch and not self._write(batch):
                if self._stop.wait(self._retry_interval_s):
                    return
                continue
            if time.monotonic() - last_repeats >= self._repeat_interval_s:
                last_repeats = time.monotonic()
                self._write_repeats()
            if not batch:
                if self._stop.is_set():
                    return
                self._wake.wait(self._flush_interval_s)
                self._wake.clear()

    def _take(self) -> list[PendingRequest]:
        with self._lock:
            return list(self._queue)

    def _write(self, batch: list[PendingRequest]) -> bool:
        """Write ``batch`` (still queued while it is written, so it counts against the bounds)."""
        try:
            for request in batch:
                self.store.append(request.records(self.store.model))
                with self._lock:
                    self._queue.popleft()
                    self._rows -= len(request.ids)
                    self._bytes -= request.nbytes
                self._written += 1
        except Unavailable as error:
            with self._progress:
                self._failure = error.message
                self._progress.notify_all()
            return False
        with self._progress:
            recovered, self._failure = self._failure, None
            self._progress.notify_all()
        if recovered is not None:
            log.warning("trigger_log_recovered", model=self.store.model)
        return True

    def _write_repeats(self) -> None:
        try:
            self.store.flush_repeats()
        except Unavailable as error:
            with self._progress:
                self._failure = error.message
