"""The trigger set: queries answered with a watermark label, kept encrypted in the private tier.

Append-only segment files, one log per API key: ``STATE/triggers/MODEL/KEYDIR/NNN.svtl``
(``STATE``: the private tier's ``state_dir``; ``KEYDIR``: a keyed hash of the API key id, so
the folder names say nothing about who asked). Each record is
``u32 length || 12-byte nonce || AES-256-GCM ciphertext`` of a JSON object (time, request id,
API key id, canonical query id, the model's label, the label answered, the sample's
back-stage inputs as received, and how the key id is known: its customer's verified request
signature, or the public tier's word alone). The record key is derived from the model's
watermark key, and each record is bound to its model, key folder, segment and position as
associated data, so a record moved, altered, removed from the middle or replayed into another
log fails authentication.

**One record per (key, query).** A query a key asks again is not written again: the log keeps
its first record and, at most once per ``flush_repeats`` call, one small *repeat* record per
repeated query with the number of repeats since the last; readers merge them into ``count``
and ``last_time``. Repeats are a signal of their own (asking a marked query again and again
is how an attacker probes or averages a mark): each time a query's count reaches a power of
two the tier logs ``marked_query_repeated``.

**Retention per key**: at most ``max_records`` records and ``max_bytes`` bytes in each key's
log (segments hold a sixteenth of either; the key's oldest segment is deleted when a bound is
passed), so one key's flood never evicts another key's evidence.

``TriggerLog.append`` writes synchronously; the private tier's request path only queues
(``private_core.watermark.trigger_queue``). A record that cannot be written raises
``Unavailable``. Several replicas (one log each) are read as a union: copy each replica's state
folder into a subfolder of the owner's state folder (``STATE/REPLICA/triggers/MODEL``). Logs
written before per-key folders (segments directly under ``MODEL/``) are still read.
"""

from __future__ import annotations

import base64
import hmac
import json
import os
import struct
import threading
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from private_core.watermark.keys import WatermarkKey
from shared.errors import Unavailable
from shared.logs import get_logger
from shared.state_files import private_dir

TRIGGER_DIR = "triggers"  # under the private tier's state_dir
SEGMENTS_PER_BOUND = 16
_LENGTH = struct.Struct(">I")
_NONCE_SIZE = 12
_SUFFIX = ".svtl"
_KEY_DIR_PREFIX = "k-"
log = get_logger(__name__)


class TriggerLogError(ValueError):
    """A trigger log record failed authentication or cannot be parsed."""


@dataclass(frozen=True)
class TriggerRecord:
    """One watermarked query of one key: when, to whom, for which query, what was answered,
    and how often the key asked it (``count``; ``last_time`` the latest)."""

    time: float
    model: str
    query_id: str  # hex canonical id (see private_core.watermark.marks)
    label: int  # the model's top-1 class
    answer: int  # the watermark label returned instead
    request_id: str = ""
    key_id: str = ""
    inputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    # How key_id is known: "public" (the public tier said so; every record made before
    # signatures) or "signed" (the customer's signature, kept here, verified by this tier).
    attribution: str = "public"
    signature: dict[str, str] = field(default_factory=dict)
    count: int = 1
    last_time: float | None = None
    repeat: bool = False  # on disk: a repeat count; merged: its first record was dropped

    def arrays(self) -> dict[str, np.ndarray]:
        """The sample's back-stage inputs as the private tier received them."""
        return {
            name: np.frombuffer(base64.b64decode(item["data"]), dtype=item["dtype"]).reshape(
                item["shape"]
            )
            for name, item in self.inputs.items()
        }


def encode_inputs(arrays: Mapping[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    """One sample's inputs in the record's JSON form."""
    return {
        name: {
            "dtype": array.dtype.str,
            "shape": list(array.shape),
            "data": base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii"),
        }
        for name, array in arrays.items()
    }


def _aad(model: str, key_dir: str, segment: int, index: int) -> bytes:
    scope = model if not key_dir else f"{model}\0{key_dir}"
    return b"splitvault-trigger\0" + scope.encode() + b"\0" + struct.pack(">QQ", segment, index)


def _record_key(key: WatermarkKey) -> AESGCM:
    return AESGCM(key.derive("splitvault/watermark/trigger-log"))


def key_folder_name(key: WatermarkKey, key_id: str) -> str:
    """The folder of ``key_id``'s log: a keyed hash, so names reveal no key ids."""
    digest = hmac.digest(
        key.derive("splitvault/watermark/trigger-folder"), key_id.encode(), "sha256"
    )
    return _KEY_DIR_PREFIX + digest.hex()[:32]


def _segments(folder: Path) -> list[tuple[int, Path]]:
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        if path.suffix == _SUFFIX and path.stem.isdigit() and path.is_file():
            found.append((int(path.stem), path))
    return sorted(found)


class _KeyLog:
    """One key's segments, which queries they hold and the repeats not yet written."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.sizes: dict[int, tuple[int, int]] = {}  # segment -> (records, bytes)
        self.where: dict[str, int] = {}  # query id -> segment of its first record
        self.counts: dict[str, int] = {}  # query id -> times asked (kept records)
        self.pending: dict[str, TriggerRecord] = {}  # query id -> repeats not yet written


class TriggerLog:
    """Appends sealed trigger records for one model, one deduplicated log per API key."""

    def __init__(
        self, folder: Path, model: str, key: WatermarkKey, max_records: int, max_bytes: int
    ) -> None:
        self.folder, self.model, self.key = folder, model, key
        self.max_records, self.max_bytes = max_records, max_bytes
        self._aead = _record_key(key)
        self._lock = threading.Lock()
        self._logs: dict[str, _KeyLog] = {}
        self._failures = 0

    def append(self, records: list[TriggerRecord]) -> None:
        """Seal and append ``records`` (a query its key asked before becomes a pending repeat);
        ``Unavailable`` (logged) if they cannot be written."""
        if not records:
            return
        self._guarded(lambda: self._append(records))

    def flush_repeats(self) -> None:
        """Write one repeat record per query asked again since the last call."""
        self._guarded(self._flush_repeats)

    def _guarded(self, write: Any) -> None:
        with self._lock:
            try:
                write()
            except OSError as error:
                self._failures += 1
                if self._failures == 1 or self._failures % 1000 == 0:
                    log.error(
                        "trigger_log_write_failed",
                        model=self.model,
                        failures=self._failures,
                        reason=str(error),
                    )
                raise Unavailable(
                    "the private tier cannot keep its watermark evidence", retry_after_s=5.0
                ) from None

    def _append(self, records: list[TriggerRecord]) -> None:
        for record in records:
            keylog = self._key_log(record.key_id)
            count = keylog.counts.get(record.query_id)
            if count is None:
                self._write(keylog, record)
                keylog.where[record.query_id] = max(keylog.sizes)
                keylog.counts[record.query_id] = 1
                continue
            keylog.counts[record.query_id] = count + 1
            pending = keylog.pending.get(record.query_id)
            keylog.pending[record.query_id] = replace(
                record,
                inputs={},
                count=1 if pending is None else pending.count + 1,
                repeat=True,
                last_time=record.time,
                time=record.time if pending is None else pending.time,
            )
            if (count + 1) & count == 0:  # a power of two
                log.warning(
                    "marked_query_repeated",
                    model=self.model,
                    key_id=record.key_id,
                    query=record.query_id[:16],
                    count=count + 1,
                )

    def _flush_repeats(self) -> None:
        for keylog in self._logs.values():
            while keylog.pending:
                query_id, record = next(iter(keylog.pending.items()))
                self._write(keylog, record)
                del keylog.pending[query_id]

    def _key_log(self, key_id: str) -> _KeyLog:
        keylog = self._logs.get(key_id)
        if keylog is None:
            name = key_folder_name(self.key, key_id)
            keylog = _KeyLog(private_dir(self.folder / name))
            for number, path in _segments(keylog.folder):
                try:
                    records = list(_read_segment(path, self._aead, self.model, name, number))
                except TriggerLogError as error:  # a torn or bad segment: never append to it
                    log.error("trigger_segment_unreadable", model=self.model, reason=str(error))
                    full = max(1, self.max_records // SEGMENTS_PER_BOUND)
                    keylog.sizes[number] = (full, path.stat().st_size)
                    continue
                keylog.sizes[number] = (len(records), path.stat().st_size)
                for record in records:
                    keylog.where.setdefault(record.query_id, number)
                    keylog.counts[record.query_id] = (
                        keylog.counts.get(record.query_id, 0) + record.count
                    )
            self._logs[key_id] = keylog
        return keylog

    def _write(self, keylog: _KeyLog, record: TriggerRecord) -> None:
        segment = self._current_segment(keylog)
        count, size = keylog.sizes.get(segment, (0, 0))
        nonce = os.urandom(_NONCE_SIZE)
        plaintext = json.dumps(asdict(record), separators=(",", ":")).encode()
        aad = _aad(self.model, keylog.folder.name, segment, count)
        sealed = nonce + self._aead.encrypt(nonce, plaintext, aad)
        path = keylog.folder / f"{segment:012d}{_SUFFIX}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, _LENGTH.pack(len(sealed)) + sealed)
        finally:
            os.close(fd)
        keylog.sizes[segment] = (count + 1, size + _LENGTH.size + len(sealed))
        self._enforce_retention(keylog)

    def _current_segment(self, keylog: _KeyLog) -> int:
        if not keylog.sizes:
            return 1
        last = max(keylog.sizes)
        count, size = keylog.sizes[last]
        full = count >= max(1, self.max_records // SEGMENTS_PER_BOUND) or size >= max(
            1, self.max_bytes // SEGMENTS_PER_BOUND
        )
        return last + 1 if full else last

    def _enforce_retention(self, keylog: _KeyLog) -> None:
        while len(keylog.sizes) > 1:
            records = sum(count for count, _ in keylog.sizes.values())
            size = sum(size for _, size in keylog.sizes.values())
            if records <= self.max_records and size <= self.max_bytes:
                return
            oldest = min(keylog.sizes)
            (keylog.folder / f"{oldest:012d}{_SUFFIX}").unlink(missing_ok=True)
            del keylog.sizes[oldest]
            for query_id in [q for q, s in keylog.where.items() if s == oldest]:
                del keylog.where[query_id]
                keylog.counts.pop(query_id, None)


def trigger_folders(state_dir: Path, model: str) -> list[Path]:
    """Every trigger log of ``model`` under a private state folder: its own
    (``triggers/MODEL``) and each replica's copied into a subfolder (``REPLICA/triggers/MODEL``)."""
    replicas = sorted(p for p in state_dir.iterdir() if p.is_dir()) if state_dir.is_dir() else []
    found = [state_dir / TRIGGER_DIR / model]
    found += [p / TRIGGER_DIR / model for p in replicas if p.name != TRIGGER_DIR]
    return [folder for folder in found if folder.is_dir()]


def read_trigger_union(
    folders: list[Path], model: str, key: WatermarkKey
) -> Iterator[TriggerRecord]:
    """The records of several replicas' logs, log by log (each authenticated on its own)."""
    for folder in folders:
        yield from read_triggers(folder, model, key)


def read_triggers(folder: Path, model: str, key: WatermarkKey) -> Iterator[TriggerRecord]:
    """Every query kept for ``model``, its repeats merged, oldest first; ``TriggerLogError`` if
    a record was tampered with."""
    aead = _record_key(key)
    merged: list[TriggerRecord] = []
    for name, sub in [("", folder), *_key_folders(folder)]:
        first: dict[str, int] = {}
        for number, path in _segments(sub):
            for record in _read_segment(path, aead, model, name, number):
                at = first.get(record.query_id)
                if at is None:
                    first[record.query_id] = len(merged)
                    merged.append(record)
                else:
                    merged[at] = _merge(merged[at], record)
    yield from sorted(merged, key=lambda record: record.time)


def _key_folders(folder: Path) -> list[tuple[str, Path]]:
    if not folder.is_dir():
        return []
    subs = (p for p in folder.iterdir() if p.is_dir() and p.name.startswith(_KEY_DIR_PREFIX))
    return [(p.name, p) for p in sorted(subs)]


def _merge(kept: TriggerRecord, repeat: TriggerRecord) -> TriggerRecord:
    last = max(t for t in (kept.last_time, kept.time, repeat.last_time, repeat.time) if t)
    return replace(kept, count=kept.count + repeat.count, last_time=last)


def _read_segment(
    path: Path, aead: AESGCM, model: str, key_dir: str, segment: int
) -> Iterator[TriggerRecord]:
    data, pos, index = path.read_bytes(), 0, 0
    while pos + _LENGTH.size <= len(data):
        (length,) = _LENGTH.unpack_from(data, pos)
        body = data[pos + _LENGTH.size : pos + _LENGTH.size + length]
        if len(body) != length or length <= _NONCE_SIZE:
            raise TriggerLogError(f"{path.name}: record {index} is cut short")
        try:
            plain = aead.decrypt(
                body[:_NONCE_SIZE], body[_NONCE_SIZE:], _aad(model, key_dir, segment, index)
            )
        except InvalidTag:
            raise TriggerLogError(
                f"{path.name}: record {index} failed authentication (tampered, moved or "
                "sealed under another watermark key)"
            ) from None
        yield TriggerRecord(**json.loads(plain))
        pos += _LENGTH.size + length
        index += 1
