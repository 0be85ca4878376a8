"""A hash-chained audit trail of every request, in SQLite; one writer thread commits it.

Each row holds ``seq`` (1, 2, 3, ... with no gaps), the request's fields, ``prev_hash`` (the
previous row's hash; 64 zeros for the first) and ``hash``, the SHA-256 of the canonical JSON of
``seq``, the fields and ``prev_hash``. ``verify_chain`` finds an edited, removed, inserted or
reordered row and says where.

A plain chain has one limit: someone who can write the file may truncate its tail, or edit a row
and recompute every later hash, and the chain still verifies. Anchoring closes that for the
records an anchor covers: ``public_api.audit_anchor`` has the private tier countersign the head
(``committed_head``) in its own ledger, and ``public_api.audit_coverage`` checks a trail against
those anchors. The trail's ``chain_id`` and the receipts live beside the records
(``public_api.audit_receipts``); admission gates (``add_admission_gate``) let the anchorer
refuse new requests while too much of the trail is unanchored.

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

Refusals that cannot be attributed to an API key (no key, or a wrong one) would let anyone fill
the trail, so they are counted instead (``AuditTrail.tally``): one record per address, model,
decision and status per ``aggregate_s`` seconds, with ``count`` the number of requests it
stands for and ``time`` the first of them. ``count`` enters the hash only when it is not 1, so
records written before the field existed still verify.
"""

from __future__ import annotations

import hashlib
import json
import math
import operator
import sqlite3
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, fields
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Protocol

import numpy as np

from public_api import audit_receipts
from public_api.audit_source import GENESIS_HASH as GENESIS_HASH  # re-exported
from public_api.audit_source import TrailSource, as_source, sqlite_head
from shared.errors import Unavailable
from shared.logs import get_logger
from shared.state_files import private_file

AUDIT_DB = "audit.sqlite3"
DECISIONS = frozenset(
    {
        "served",
        "unauthenticated",
        "forbidden",
        "terms_required",
        "rate_limited",
        "quota_exceeded",
        "blocked",
        "bad_request",
        "unavailable",
        "error",
        "closed",  # the connection closed before an answer: read deadline (408) or client (499)
    }
)

log = get_logger(__name__)
FailurePolicy = Literal["refuse", "buffer"]


@dataclass(frozen=True)
class AuditRecord:
    """One request as the trail keeps it; ``answer`` is the compact JSON returned, if any."""

    time: float
    key_id: str | None
    client: str
    model: str | None
    input_sha256: str | None
    answer: str | None
    decision: str
    status: int
    monitor_score: float | None = None
    request_id: str | None = None
    count: int = 1  # requests this record stands for (more than 1: aggregated refusals)

    def __post_init__(self) -> None:
        if self.decision not in DECISIONS:
            raise ValueError(f"unknown audit decision {self.decision!r}")
        if self.count < 1:
            raise ValueError("audit count must be at least 1")
        if not math.isfinite(self.time):
            raise ValueError("audit time must be finite")
        if self.monitor_score is not None and not math.isfinite(self.monitor_score):
            raise ValueError("monitor score must be finite or None")
        # Store exactly what SQLite gives back, so the hash is recomputed byte for byte.
        object.__setattr__(self, "time", float(self.time))
        object.__setattr__(self, "status", int(self.status))
        object.__setattr__(self, "count", int(self.count))
        if self.monitor_score is not None:
            object.__setattr__(self, "monitor_score", float(self.monitor_score))


_FIELDS = tuple(field.name for field in fields(AuditRecord))
# A queued record and, when submitted, the future its commit resolves.
_Queued = tuple[AuditRecord, "Future[int] | None"]
_values_of = operator.attrgetter(*_FIELDS)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY,
    time REAL NOT NULL,
    key_id TEXT,
    client TEXT NOT NULL,
    model TEXT,
    input_sha256 TEXT,
    answer TEXT,
    decision TEXT NOT NULL,
    status INTEGER NOT NULL,
    monitor_score REAL,
    request_id TEXT,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL,
    count INTEGER NOT NULL DEFAULT 1
);
CREATE INDEX IF NOT EXISTS audit_by_key ON audit (key_id, seq);
"""
_INSERT = (
    "INSERT INTO audit (seq, time, key_id, client, model, input_sha256, answer, decision, status, "
    "monitor_score, request_id, count, prev_hash, hash) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


class TrailStorage(Protocol):
    """Where a writer commits its records: SQLite here, PostgreSQL in ``public_api.pg_audit``."""

    def commit(self, batch: list[AuditRecord]) -> tuple[int, str]:
        """Chain ``batch`` on the stored head and commit it in one transaction (rolled back on
        failure); returns the new head's seq and hash."""
        ...

    def close(self) -> None:
        """Release the storage."""
        ...


def chain_rows(
    batch: list[AuditRecord], seq: int, prev_hash: str
) -> tuple[list[tuple[Any, ...]], int, str]:
    """Rows ``(seq, *fields, prev_hash, hash)`` of ``batch`` chained after ``(seq, prev_hash)``,
    and the new head."""
    rows = []
    for record in batch:
        seq += 1
        values = dict(zip(_FIELDS, _values_of(record), strict=True))
        digest = record_hash(seq, values, prev_hash)
        rows.append((seq, *values.values(), prev_hash, digest))
        prev_hash = digest
    return rows, seq, prev_hash


class SqliteTrailStorage:
    """``TrailStorage`` in one SQLite file (another process may share it)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def commit(self, batch: list[AuditRecord]) -> tuple[int, str]:
        try:
            self._db.execute("BEGIN IMMEDIATE")
            # Read the head inside the write lock: another process may share this file.
            rows, seq, prev_hash = chain_rows(batch, *sqlite_head(self._db))
            self._db.executemany(_INSERT, rows)
            self._db.execute("COMMIT")
        except Exception:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise
        return seq, prev_hash

    def close(self) -> None:
        self._db.close()


@dataclass(frozen=True)
class VerifyResult:
    """The outcome of ``verify_chain``: ``records`` rows in all, the first bad one and why."""

    ok: bool
    records: int
    first_bad_seq: int | None = None
    problem: str | None = None


def record_hash(seq: int, values: dict[str, Any], prev_hash: str) -> str:
    """SHA-256 (hex) of the canonical JSON of ``seq``, the record's fields and ``prev_hash``.

    ``count`` is left out when it is 1 (see the module docstring).
    """
    payload = {**_hashed(values), "seq": seq, "prev_hash": prev_hash}
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


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
        private_file(path)  # 0600 before SQLite creates it 0644
        db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        try:
            db.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.executescript(_SCHEMA)
            _migrate(db)
            chain_id = audit_receipts.prepare(db)
            committed = sqlite_head(db)
        except sqlite3.Error:
            db.close()
            raise
        return cls.begin(
            SqliteTrailStorage(db),
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


def _hashed(values: dict[str, Any]) -> dict[str, Any]:
    """The fields that enter the hash (and an export): ``count`` only when it is not 1."""
    if values.get("count", 1) == 1:
        return {name: value for name, value in values.items() if name != "count"}
    return values


def _migrate(db: sqlite3.Connection) -> None:
    """Add ``count`` to a trail created before it existed (its rows stand for one request)."""
    columns = {row[1] for row in db.execute("PRAGMA table_info(audit)")}
    if "count" not in columns:
        try:
            db.execute("ALTER TABLE audit ADD COLUMN count INTEGER NOT NULL DEFAULT 1")
        except sqlite3.OperationalError as error:  # another process added it meanwhile
            if "duplicate column" not in str(error):
                raise


def head(trail: Path | TrailSource) -> tuple[int, str]:
    """The last record's seq and hash (``(0, GENESIS_HASH)`` when empty): the value to anchor."""
    return as_source(trail).head()


def verify_chain(trail: Path | TrailSource) -> VerifyResult:
    """Check seq numbering, every ``prev_hash`` link and every hash; stop at the first problem."""
    source = as_source(trail)
    try:
        total = source.count()
    except sqlite3.OperationalError as error:
        return VerifyResult(False, 0, None, f"the audit table cannot be read: {error}")
    expected, prev_hash = 1, GENESIS_HASH
    for seq, *values, stored_prev, stored_hash in source.rows():
        problem = _row_problem(seq, values, stored_prev, stored_hash, expected, prev_hash)
        if problem is not None:
            bad = expected if seq != expected else seq
            return VerifyResult(False, total, bad, problem)
        expected, prev_hash = seq + 1, stored_hash
    return VerifyResult(True, total)


def _row_problem(
    seq: int, values: list[Any], stored_prev: str, stored_hash: str, expected: int, prev: str
) -> str | None:
    if seq != expected:
        if expected == 1:
            return f"record 1 missing (the trail starts at record {seq})"
        missing = f"record {expected}" if seq == expected + 1 else f"records {expected}-{seq - 1}"
        return f"{missing} missing (gap after {expected - 1})"
    if stored_prev != prev:
        before = "the genesis hash" if seq == 1 else f"the hash of record {seq - 1}"
        return (
            f"record {seq}: prev_hash does not match {before} "
            "(a record was altered, inserted, removed or reordered)"
        )
    try:
        computed = record_hash(seq, dict(zip(_FIELDS, values, strict=True)), stored_prev)
    except (TypeError, ValueError):  # a BLOB or other value the writer never stores
        return f"record {seq}: a field holds a value the trail never writes"
    if computed != stored_hash:
        return f"record {seq}: hash does not match its contents"
    return None


def export_records(trail: Path | TrailSource, key_id: str) -> Iterator[dict[str, Any]]:
    """Every record of ``key_id`` in seq order, as JSON-serialisable dicts with their hashes."""
    names = ("seq", *_FIELDS, "prev_hash", "hash")
    for row in as_source(trail).key_rows(key_id):
        yield _hashed(dict(zip(names, row, strict=True)))


def input_digest(arrays: dict[str, np.ndarray[Any, Any]]) -> str:
    """SHA-256 (hex) over the inputs: sorted names, each with dtype, shape and raw bytes."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        array = np.asarray(arrays[name])
        if array.dtype.hasobject:
            raise ValueError(f"input {name!r} has an object dtype; it has no canonical bytes")
        header = json.dumps(
            {"name": name, "dtype": array.dtype.str, "shape": list(array.shape)},
            sort_keys=True,
            separators=(",", ":"),
        ).encode("utf-8")
        digest.update(len(header).to_bytes(8, "big") + header)
        digest.update(array.nbytes.to_bytes(8, "big"))
        contiguous = array if array.flags.c_contiguous else np.ascontiguousarray(array)
        digest.update(contiguous.data)
    return digest.hexdigest()
