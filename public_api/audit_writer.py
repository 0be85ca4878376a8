"""The audit trail's writer: one thread chains and commits records in batches.

One writer thread chains and commits records in batches (one transaction each), so there is one
chain per trail whatever the concurrency. Records reach it two ways:

* ``AuditTrail.submit`` (group commit): the record is queued, the writer woken, and the returned
  future is resolved with the record's seq once the transaction holding it has committed; the
  records that arrive while one commit runs share the next. If that commit fails, the future
  fails with ``Unavailable`` and the record is dropped, not retried: its request is answered
  503, and that outcome is recorded instead. Served answers wait for it under the ``"refuse"``
  policy (``commits_before_response``).
* ``AuditTrail.append`` only queues the record (about a microsecond); the writer commits it within
  ``flush_interval_s``, or as soon as a batch is ready. Refusals are recorded this way, and served
  answers under ``"buffer"``. When the queue is full, or the last write failed, it raises
  ``Unavailable``: a request is refused rather than served unaudited.

The failure policy (``on_failure``): ``"refuse"`` refuses new records while the writer fails
(once it holds none, a request is let through every ``retry_interval_s``: its commit tries the
storage again); ``"buffer"`` answers without waiting for the commit and keeps accepting records
while fewer than ``buffer_max`` wait unwritten, so a short storage outage does not stop service,
then refuses. A crash (SIGKILL, power loss) therefore loses no served record under ``"refuse"``
and at most ``buffer_max`` under ``"buffer"``. Queued records are retried every
``retry_interval_s`` and, once storage recovers, written in order: nothing appended is dropped.

Refusals that cannot be attributed to an API key are counted (``tally``; see
``public_api.audit_tally``).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from types import TracebackType
from typing import Literal

from public_api.audit import GENESIS_HASH, AuditRecord, TrailStorage, open_sqlite_storage
from public_api.audit_tally import RefusalTally, Tallied
from shared.errors import Unavailable
from shared.logs import get_logger

log = get_logger(__name__)
FailurePolicy = Literal["refuse", "buffer"]
# A queued record and, when submitted, the future its commit resolves.
_Queued = tuple[AuditRecord, "Future[int] | None"]


class AuditTrail:
    """Appends records without blocking; one writer thread chains and commits them in batches."""

    def __init__(
        self,
        storage: TrailStorage,
        *,
        batch_size: int,
        flush_interval_s: float,
        max_pending: int,
        retry_interval_s: float,
        on_failure: FailurePolicy = "refuse",
        buffer_max: int = 10_000,
        aggregate_s: float = 10.0,
    ) -> None:
        self._storage = storage
        self._tally = RefusalTally(aggregate_s)
        self._batch_size = batch_size
        self._flush_interval_s = flush_interval_s
        self._retry_interval_s = retry_interval_s
        self._max_pending = max_pending
        self._on_failure = on_failure
        self._buffer_max = buffer_max
        self._queue: deque[_Queued] = deque()
        self._lock = threading.Lock()
        self._progress = threading.Condition()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._appended = 0
        self._written = 0
        self._dropped = 0  # submitted records whose commit failed (their requests got 503)
        self._unwritten = 0
        self._failure: str | None = None
        self._failed_at = 0.0
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
        self.chain_id = ""  # set by ``open`` (audit_receipts.prepare)
        self._committed: tuple[int, str] = (0, GENESIS_HASH)
        self._on_commit: list[Callable[[int, str], None]] = []
        self._gates: list[Callable[[], Unavailable | None]] = []

    @classmethod
    def open(
        cls,
        path: Path,
        *,
        batch_size: int = 256,
        flush_interval_s: float = 0.05,
        max_pending: int = 100_000,
        retry_interval_s: float = 1.0,
        busy_timeout_s: float = 5.0,
        on_failure: FailurePolicy = "refuse",
        buffer_max: int = 10_000,
        aggregate_s: float = 10.0,
    ) -> AuditTrail:
        """Open (or create) the trail at ``path`` and start its writer; chains on from the last row.

        The writer commits every ``flush_interval_s``, or at once when ``batch_size`` records
        wait; ``max_pending`` bounds the queue (beyond it ``append`` refuses records);
        ``on_failure`` and ``buffer_max`` say what happens while writes fail (see the module);
        tallied refusals are recorded every ``aggregate_s`` seconds.
        """
        storage, chain_id, committed = open_sqlite_storage(path, busy_timeout_s)
        return cls.begin(
            storage,
            chain_id,
            committed,
            batch_size=batch_size,
            flush_interval_s=flush_interval_s,
            max_pending=max_pending,
            retry_interval_s=retry_interval_s,
            on_failure=on_failure,
            buffer_max=buffer_max,
            aggregate_s=aggregate_s,
        )

    @classmethod
    def begin(
        cls,
        storage: TrailStorage,
        chain_id: str,
        committed: tuple[int, str],
        *,
        batch_size: int = 256,
        flush_interval_s: float = 0.05,
        max_pending: int = 100_000,
        retry_interval_s: float = 1.0,
        on_failure: FailurePolicy = "refuse",
        buffer_max: int = 10_000,
        aggregate_s: float = 10.0,
    ) -> AuditTrail:
        """A trail writing to ``storage`` (chain ``chain_id``, head ``committed``), started."""
        if batch_size < 1 or max_pending < 1 or buffer_max < 1:
            raise ValueError("batch_size, max_pending and buffer_max must be at least 1")
        if on_failure not in ("refuse", "buffer"):
            raise ValueError(f"unknown audit failure policy {on_failure!r}")
        trail = cls(
            storage,
            batch_size=batch_size,
            flush_interval_s=flush_interval_s,
            max_pending=max_pending,
            retry_interval_s=retry_interval_s,
            on_failure=on_failure,
            buffer_max=buffer_max,
            aggregate_s=aggregate_s,
        )
        trail.chain_id, trail._committed = chain_id, committed
        trail._thread.start()
        return trail

    @property
    def pending(self) -> int:
        """Records appended or submitted but not yet written (nor dropped)."""
        return self._appended - self._written - self._dropped

    @property
    def commits_before_response(self) -> bool:
        """Whether a served answer waits for its record's commit (``submit``): the ``"refuse"``
        policy; under ``"buffer"`` it is only queued (``append``)."""
        return self._on_failure == "refuse"

    @property
    def written(self) -> int:
        """Records this object has committed since it was opened."""
        return self._written

    @property
    def failure(self) -> str | None:
        """Why the last write failed, or ``None`` while writes succeed."""
        return self._failure

    @property
    def committed_head(self) -> tuple[int, str]:
        """The seq and hash of the last record committed (``(0, GENESIS_HASH)``: none)."""
        return self._committed

    def add_commit_listener(self, listener: Callable[[int, str], None]) -> None:
        """Call ``listener(seq, hash)`` from the writer thread after each commit."""
        self._on_commit.append(listener)

    def add_admission_gate(self, gate: Callable[[], Unavailable | None]) -> None:
        """Have ``check_accepting`` also refuse with what ``gate()`` returns (``None``: admit).

        Only new requests are refused: records of requests already admitted, and of refusals,
        are still written.
        """
        self._gates.append(gate)

    def check_accepting(self) -> None:
        """``Unavailable`` if ``append`` would refuse a record now (so refuse before any work),
        or an admission gate refuses."""
        with self._lock:
            refusal = self._refusal()
        for gate in self._gates:
            refusal = refusal or gate()
        if refusal is not None:
            raise refusal

    def append(self, record: AuditRecord) -> None:
        """Queue ``record`` for writing; ``Unavailable`` if the trail cannot take it now."""
        with self._lock:
            self._enqueue(record, None)
            if len(self._queue) == self._batch_size:
                self._wake.set()

    def submit(self, record: AuditRecord) -> Future[int]:
        """Queue ``record`` and wake the writer; the future gives its seq once committed, or
        fails with ``Unavailable`` (the record is then dropped). ``Unavailable`` at once if the
        trail cannot take it now."""
        committed: Future[int] = Future()
        with self._lock:
            self._enqueue(record, committed)
        self._wake.set()
        return committed

    def _enqueue(self, record: AuditRecord, committed: Future[int] | None) -> None:
        """Queue one record past the refusal policy; called with ``_lock`` held."""
        refusal = self._refusal()
        if refusal is not None:
            raise refusal
        self._queue.append((record, committed))
        self._appended += 1

    def tally(self, what: Tallied) -> None:
        """Count one refusal; never refuses (the request was refused anyway)."""
        self._tally.add(what, time.time())

    def flush(self, timeout: float = 5.0) -> None:
        """Wait until every record appended so far is written.

        ``Unavailable`` if the writer is failing, ``TimeoutError`` after ``timeout`` seconds.
        """
        target = self._appended
        deadline = time.monotonic() + timeout
        self._wake.set()
        with self._progress:
            while self._written + self._dropped < target:
                if self._failure is not None:
                    raise Unavailable(f"audit trail cannot write: {self._failure}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    missing = target - self._written
                    raise TimeoutError(f"audit trail: {missing} records unwritten after {timeout}s")
                self._progress.wait(remaining)

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued, stop the writer and close the database.

        ``Unavailable`` if records were left unwritten (they are also logged as an error).
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._enqueue_tallies(self._tally.drain())
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise Unavailable(f"audit writer still busy after {timeout}s ({self.pending} pending)")
        self._storage.close()
        if self._unwritten:
            raise Unavailable(
                f"audit trail closed with {self._unwritten} records unwritten: {self._failure}"
            )

    def __enter__(self) -> AuditTrail:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _refusal(self) -> Unavailable | None:
        """Why a record would be refused now, or ``None``; called with ``_lock`` held."""
        failure = self._failure
        if failure is not None and self._on_failure == "refuse" and self._still_failing():
            return Unavailable(f"audit trail cannot write: {failure}", retry_after_s=1.0)
        if self._on_failure == "buffer" and self.pending >= self._buffer_max:
            if failure is None:  # the bound on what a crash may lose holds while healthy too
                return Unavailable(
                    f"audit trail has {self._buffer_max} records waiting to be written",
                    retry_after_s=1.0,
                )
            return Unavailable(
                f"audit trail cannot write and its buffer of {self._buffer_max} records is "
                f"full: {failure}",
                retry_after_s=1.0,
            )
        if self._closed:
            return Unavailable("audit trail is closed")
        if len(self._queue) >= self._max_pending:
            return Unavailable("audit trail is not keeping up", retry_after_s=1.0)
        return None

    def _still_failing(self) -> bool:
        """While the writer retries records it holds, or for ``retry_interval_s`` after a failed
        commit when it holds none (then a request may try the storage again)."""
        recent = time.monotonic() - self._failed_at < self._retry_interval_s
        return self.pending > 0 or recent

    def _enqueue_tallies(self, records: list[AuditRecord]) -> None:
        """Queue tallied records past the refusal policy (few: one per address and interval)."""
        if not records:
            return
        with self._lock:
            room = max(0, self._max_pending - len(self._queue))
            self._queue.extend((record, None) for record in records[:room])
            self._appended += min(room, len(records))
        if room < len(records):
            log.error("audit_tally_dropped", records=len(records) - room, reason="queue full")

    def _run(self) -> None:
        kept: list[_Queued] = []  # appended records of a failed commit, retried first
        while True:
            self._enqueue_tallies(self._tally.due(time.time()))
            batch = kept + self._take(self._batch_size - len(kept))
            if not batch:
                if self._stop.is_set():
                    return
                self._wake.wait(self._flush_interval_s)
                self._wake.clear()
                continue
            if self._write(batch):
                kept = []
                continue
            kept = self._drop_submitted(batch)
            if self._stop.is_set():
                self._unwritten = len(kept) + len(self._queue)
                log.error("audit_records_unwritten", count=self._unwritten, reason=self._failure)
                return
            self._wake.wait(self._retry_interval_s)  # a submitted record tries again at once
            self._wake.clear()

    def _take(self, room: int) -> list[_Queued]:
        with self._lock:
            count = min(room, len(self._queue))
            return [self._queue.popleft() for _ in range(count)]

    def _write(self, batch: list[_Queued]) -> bool:
        """Chain and commit ``batch`` in one transaction, then resolve its futures; on failure,
        record why."""
        try:
            seq, prev_hash = self._storage.commit([record for record, _ in batch])
        except Exception as error:
            self._fail(f"{type(error).__name__}: {error}")
            return False
        with self._progress:
            self._written += len(batch)
            self._committed = (seq, prev_hash)
            recovered, self._failure = self._failure, None
            self._progress.notify_all()
        first = seq - len(batch) + 1
        for offset, (_, committed) in enumerate(batch):
            if committed is not None:
                committed.set_result(first + offset)
        for listener in self._on_commit:
            listener(seq, prev_hash)
        if recovered is not None:
            log.warning("audit_write_recovered", after=recovered, pending=self.pending)
        return True

    def _drop_submitted(self, batch: list[_Queued]) -> list[_Queued]:
        """After a failed commit: fail and drop every submitted record, in ``batch`` and queued
        (each would wait for another failing commit); returns the appended ones, to retry."""
        with self._lock:
            queued = list(self._queue)
            self._queue = deque(item for item in queued if item[1] is None)
        failed = [item for item in batch + queued if item[1] is not None]
        with self._progress:
            self._dropped += len(failed)
            self._progress.notify_all()
        for _, committed in failed:
            assert committed is not None
            message = f"audit trail cannot write: {self._failure}"
            committed.set_exception(Unavailable(message, retry_after_s=1.0))
        return [item for item in batch if item[1] is None]

    def _fail(self, reason: str) -> None:
        if reason != self._failure:
            log.error(
                "audit_write_failed", reason=reason, pending=self.pending, policy=self._on_failure
            )
        with self._progress:
            self._failure = reason
            self._failed_at = time.monotonic()
            self._progress.notify_all()
