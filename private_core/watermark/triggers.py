"""The trigger set: queries answered with a watermark label, kept encrypted in the private tier.

Append-only segment files under ``STATE/triggers/MODEL/`` (``STATE``: the private tier's
``state_dir``, default ``private/state``). Each record is
``u32 length || 12-byte nonce || AES-256-GCM ciphertext`` of a JSON object (time, request id,
API key id, canonical query id, the model's label, the label answered, the sample's
back-stage inputs as received, and how the key id is known: its customer's verified request
signature, or the public tier's word alone). The record key is derived from the model's watermark key, and
each record is bound to its model, segment and position as associated data, so a record moved,
altered, removed from the middle or replayed into another log fails authentication. Retention:
at most ``max_records`` records and ``max_bytes`` bytes; segments hold a sixteenth of either,
and the oldest segment is deleted when a bound is passed.

A record that cannot be written is not kept silently: ``append`` raises ``Unavailable``, so the
request that was watermarked is refused (503) instead of answered without evidence, as the
public tier's audit trail refuses by default. Several replicas (one log each, as Kubernetes
pods with their own volume) are read as a union: copy each replica's state folder into a
subfolder of the owner's state folder (``STATE/REPLICA/triggers/MODEL``).
"""

from __future__ import annotations

import base64
import json
import os
import struct
import threading
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
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
log = get_logger(__name__)


class TriggerLogError(ValueError):
    """A trigger log record failed authentication or cannot be parsed."""


@dataclass(frozen=True)
class TriggerRecord:
    """One watermarked answer: when, to whom, for which query, and what was answered."""

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


def _aad(model: str, segment: int, index: int) -> bytes:
    return b"splitvault-trigger\0" + model.encode() + b"\0" + struct.pack(">QQ", segment, index)


def _record_key(key: WatermarkKey) -> AESGCM:
    return AESGCM(key.derive("splitvault/watermark/trigger-log"))


def _segments(folder: Path) -> list[tuple[int, Path]]:
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        if path.suffix == _SUFFIX and path.stem.isdigit():
            found.append((int(path.stem), path))
    return sorted(found)


def _scan(path: Path) -> tuple[int, int]:
    """Records and bytes of a segment (a torn last record is not counted)."""
    data = path.read_bytes()
    pos = count = 0
    while pos + _LENGTH.size <= len(data):
        (length,) = _LENGTH.unpack_from(data, pos)
        if pos + _LENGTH.size + length > len(data):
            break
        pos += _LENGTH.size + length
        count += 1
    return count, len(data)


class TriggerLog:
    """Appends sealed trigger records for one model, within the retention bounds."""

    def __init__(
        self, folder: Path, model: str, key: WatermarkKey, max_records: int, max_bytes: int
    ) -> None:
        self.folder, self.model = folder, model
        self.max_records, self.max_bytes = max_records, max_bytes
        self._aead = _record_key(key)
        self._lock = threading.Lock()
        self._sizes: dict[int, tuple[int, int]] = {}
        self._opened = False
        self._failures = 0

    def append(self, records: list[TriggerRecord]) -> None:
        """Seal and append ``records``; ``Unavailable`` (logged) if they cannot be written."""
        if not records:
            return
        with self._lock:
            try:
                self._append(records)
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
        if not self._opened:
            private_dir(self.folder)
            self._sizes = {number: _scan(path) for number, path in _segments(self.folder)}
            self._opened = True
        for record in records:
            segment = self._current_segment()
            count, size = self._sizes.get(segment, (0, 0))
            nonce = os.urandom(_NONCE_SIZE)
            plaintext = json.dumps(asdict(record), separators=(",", ":")).encode()
            sealed = nonce + self._aead.encrypt(nonce, plaintext, _aad(self.model, segment, count))
            path = self.folder / f"{segment:012d}{_SUFFIX}"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                os.write(fd, _LENGTH.pack(len(sealed)) + sealed)
            finally:
                os.close(fd)
            self._sizes[segment] = (count + 1, size + _LENGTH.size + len(sealed))
            self._enforce_retention()

    def _current_segment(self) -> int:
        if not self._sizes:
            return 1
        last = max(self._sizes)
        count, size = self._sizes[last]
        full = count >= max(1, self.max_records // SEGMENTS_PER_BOUND) or size >= max(
            1, self.max_bytes // SEGMENTS_PER_BOUND
        )
        return last + 1 if full else last

    def _enforce_retention(self) -> None:
        while len(self._sizes) > 1:
            records = sum(count for count, _ in self._sizes.values())
            size = sum(size for _, size in self._sizes.values())
            if records <= self.max_records and size <= self.max_bytes:
                return
            oldest = min(self._sizes)
            (self.folder / f"{oldest:012d}{_SUFFIX}").unlink(missing_ok=True)
            del self._sizes[oldest]


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
    """Every record kept for ``model``, oldest first; ``TriggerLogError`` if one was tampered."""
    aead = _record_key(key)
    for segment, path in _segments(folder):
        data, pos, index = path.read_bytes(), 0, 0
        while pos + _LENGTH.size <= len(data):
            (length,) = _LENGTH.unpack_from(data, pos)
            body = data[pos + _LENGTH.size : pos + _LENGTH.size + length]
            if len(body) != length or length <= _NONCE_SIZE:
                raise TriggerLogError(f"{path.name}: record {index} is cut short")
            try:
                plain = aead.decrypt(
                    body[:_NONCE_SIZE], body[_NONCE_SIZE:], _aad(model, segment, index)
                )
            except InvalidTag:
                raise TriggerLogError(
                    f"{path.name}: record {index} failed authentication (tampered, moved or "
                    "sealed under another watermark key)"
                ) from None
            yield TriggerRecord(**json.loads(plain))
            pos += _LENGTH.size + length
            index += 1
