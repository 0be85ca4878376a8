"""The private ledger: the private tier's own append-only, hash-chained record of its decisions.

It lives in the private tier's state volume, never in a store the public tier can reach. One
segment per private replica, ``STATE/ledger/REPLICA.svlg``: JSON lines, each a record with
``seq`` (1, 2, ... without gaps), ``time``, ``kind`` (one of ``KINDS``), ``payload`` (a JSON
object), ``prev`` (the previous record's hash, 64 zeros for the first) and ``hash`` (SHA-256 of
the canonical JSON of the rest). Kinds today: ``anchor`` (audit anchors) and ``signing_key``
(the replica's receipt-signing key); budgets, nonces and key registrations are added to
``KINDS`` by the features that keep them.

``append`` writes one line and fsyncs it before it returns. A write that fails is undone (the
file truncated back to its last record) and raises ``LedgerUnavailable``, so the operation that
needed the record is refused, never done unrecorded. A failure that cannot be undone leaves the
ledger refusing every append.

Opening a segment checks it whole. A last line without its newline is a record whose append
never returned (a crash before the fsync): it is dropped (``ledger_torn_tail_dropped``).
Anything else that does not check (bad JSON, a gap, a broken link or hash) makes the segment
*corrupt*: logged as ``ledger_corrupt``, reported by ``problem`` (health, metrics) and every
``append`` refused until an operator moves the segment aside.

An open segment is held with an exclusive ``flock``: a second process with the same replica id
on the same folder takes the next free name (``REPLICA-2``, ...), so segments never interleave.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.errors import Unavailable
from shared.logs import get_logger
from shared.state_files import FILE_MODE, private_dir

LEDGER_DIR = "ledger"  # under the private tier's state_dir
SUFFIX = ".svlg"
GENESIS = "0" * 64
KINDS = frozenset({"anchor", "signing_key"})
REPLICA_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
MAX_SEGMENTS_PER_REPLICA = 64
log = get_logger(__name__)


class LedgerUnavailable(Unavailable):
    """The ledger cannot record now (corrupt segment, failed write): refuse the operation."""


class LedgerCorrupt(ValueError):
    """A segment does not check (see ``read_segment``)."""


@dataclass(frozen=True)
class LedgerRecord:
    """One ledger record; ``hash`` covers every other field."""

    seq: int
    time: float
    kind: str
    payload: dict[str, Any]
    prev: str
    hash: str

    def line(self) -> bytes:
        """The record as its segment stores it: canonical JSON and a newline."""
        return _canonical({**self._body(), "hash": self.hash}) + b"\n"

    def _body(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "time": self.time,
            "kind": self.kind,
            "payload": self.payload,
            "prev": self.prev,
        }


def record_hash(seq: int, when: float, kind: str, payload: dict[str, Any], prev: str) -> str:
    """SHA-256 (hex) of the canonical JSON of a record's fields but its hash."""
    body = {"seq": seq, "time": when, "kind": kind, "payload": payload, "prev": prev}
    return hashlib.sha256(_canonical(body)).hexdigest()


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


@dataclass(frozen=True)
class SegmentRead:
    """What ``read_segment`` found: the records that check, the bytes they take, whether a torn
    last line followed them, and the first problem (``None``: the segment checks)."""

    records: list[LedgerRecord]
    good_bytes: int
    torn: bool
    problem: str | None


def read_segment(path: Path) -> SegmentRead:
    """Read and check a segment; stops at the first record that does not check."""
    data = path.read_bytes()
    records: list[LedgerRecord] = []
    pos, prev = 0, GENESIS
    while pos < len(data):
        end = data.find(b"\n", pos)
        if end < 0:
            return SegmentRead(records, pos, True, None)
        try:
            record = _parse(data[pos:end], len(records) + 1, prev)
        except LedgerCorrupt as error:
            return SegmentRead(
                records, pos, False, f"{path.name}: record {len(records) + 1}: {error}"
            )
        records.append(record)
        pos, prev = end + 1, record.hash
    return SegmentRead(records, pos, False, None)


def _parse(line: bytes, seq: int, prev: str) -> LedgerRecord:
    try:
        raw = json.loads(line)
        record = LedgerRecord(
            seq=raw["seq"],
            time=float(raw["time"]),
            kind=raw["kind"],
            payload=raw["payload"],
            prev=raw["prev"],
            hash=raw["hash"],
        )
    except (ValueError, KeyError, TypeError):
        raise LedgerCorrupt("not a ledger record") from None
    if set(raw) != {"seq", "time", "kind", "payload", "prev", "hash"}:
        raise LedgerCorrupt("unexpected fields")
    if record.seq != seq:
        raise LedgerCorrupt(f"seq {record.seq!r} where {seq} was expected (a gap or reorder)")
    if not isinstance(record.kind, str) or not isinstance(record.payload, dict):
        raise LedgerCorrupt("kind or payload of the wrong type")
    if record.prev != prev:
        raise LedgerCorrupt("prev does not match the previous record's hash")
    if record_hash(seq, record.time, record.kind, record.payload, prev) != record.hash:
        raise LedgerCorrupt("hash does not match the record's contents")
    return record


class Ledger:
    """One replica's open segment; thread-safe. Build it with ``open``."""

    def __init__(self, path: Path, fd: int, read: SegmentRead) -> None:
        self.path = path
        self._fd = fd
        self._lock = threading.Lock()
        self._size = read.good_bytes
        last = read.records[-1] if read.records else None
        self._seq = 0 if last is None else last.seq
        self._head = GENESIS if last is None else last.hash
        self._problem = read.problem

    @classmethod
    def open(cls, state_dir: Path, replica_id: str) -> Ledger:
        """Open (or create) ``replica_id``'s segment under ``state_dir/ledger`` and check it.

        A corrupt segment still opens (``problem`` says why; appends are refused).
        """
        if not REPLICA_ID.fullmatch(replica_id):
            raise ValueError(f"replica id {replica_id!r}: use letters, digits, '.', '_', '-'")
        folder = private_dir(state_dir / LEDGER_DIR)
        for n in range(1, MAX_SEGMENTS_PER_REPLICA + 1):
            name = replica_id if n == 1 else f"{replica_id}-{n}"
            path = folder / f"{name}{SUFFIX}"
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, FILE_MODE)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                log.info("ledger_segment_busy", segment=path.name)
                continue
            return cls._opened(path, fd)
        raise ValueError(f"every ledger segment name of replica {replica_id!r} is in use")

    @classmethod
    def _opened(cls, path: Path, fd: int) -> Ledger:
        os.fchmod(fd, FILE_MODE)
        _sync_dir(path.parent)
        read = read_segment(path)
        if read.torn and read.problem is None:
            os.ftruncate(fd, read.good_bytes)
            os.fsync(fd)
            log.warning("ledger_torn_tail_dropped", segment=path.name, kept=len(read.records))
        if read.problem is not None:
            log.error("ledger_corrupt", segment=str(path), problem=read.problem)
        ledger = cls(path, fd, read)
        log.info("ledger_opened", segment=str(path), records=ledger.seq, ok=ledger.ok)
        return ledger

    @property
    def replica_id(self) -> str:
        """The segment's name: this replica's id (``-N`` added when the name was taken)."""
        return self.path.name.removesuffix(SUFFIX)

    @property
    def seq(self) -> int:
        """The number of records (the last record's seq)."""
        return self._seq

    @property
    def head(self) -> str:
        """The last record's hash (``GENESIS`` when empty)."""
        return self._head

    @property
    def problem(self) -> str | None:
        """Why the ledger refuses appends (corrupt, or a write that could not be undone)."""
        return self._problem

    @property
    def ok(self) -> bool:
        """Whether the ledger accepts appends."""
        return self._problem is None

    def append(self, kind: str, payload: dict[str, Any]) -> LedgerRecord:
        """Write, fsync and return one record; ``LedgerUnavailable`` if it cannot be recorded."""
        if kind not in KINDS:
            raise ValueError(f"unknown ledger record kind {kind!r}")
        with self._lock:
            if self._problem is not None:
                raise LedgerUnavailable(f"the private ledger refuses records: {self._problem}")
            seq, when = self._seq + 1, time.time()
            digest = record_hash(seq, when, kind, payload, self._head)
            record = LedgerRecord(seq, when, kind, payload, self._head, digest)
            self._write(record.line())
            self._seq, self._head = seq, digest
            return record

    def iter(self, kind: str | None = None) -> Iterator[LedgerRecord]:
        """The segment's records (of ``kind`` only, if given), read and checked from the file."""
        with self._lock:
            read = read_segment(self.path)
        if read.problem is not None:
            raise LedgerCorrupt(read.problem)
        return (record for record in read.records if kind is None or record.kind == kind)

    def close(self) -> None:
        """Release the segment (and its lock)."""
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def _write(self, line: bytes) -> None:
        """Append ``line`` durably, or undo it and raise ``LedgerUnavailable``."""
        try:
            view = memoryview(line)
            while view:
                view = view[os.write(self._fd, view) :]
            os.fsync(self._fd)
        except OSError as error:
            reason = f"{type(error).__name__}: {error.strerror or error}"
            self._undo(reason)
            log.error("ledger_write_failed", segment=self.path.name, reason=reason)
            raise LedgerUnavailable(f"the private ledger cannot write: {reason}") from None
        self._size += len(line)

    def _undo(self, reason: str) -> None:
        try:
            os.ftruncate(self._fd, self._size)
            os.fsync(self._fd)
        except OSError as error:
            self._problem = f"a failed write ({reason}) could not be undone: {error}"
            log.error("ledger_corrupt", segment=str(self.path), problem=self._problem)


def _sync_dir(folder: Path) -> None:
    """fsync a folder, so that a segment just created survives a crash."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def segments(state_dir: Path) -> list[Path]:
    """Every segment under ``state_dir/ledger``, by name."""
    folder = state_dir / LEDGER_DIR
    return sorted(folder.glob(f"*{SUFFIX}")) if folder.is_dir() else []
