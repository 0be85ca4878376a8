"""Keyed, per-query decisions of the watermark: which queries, which label, which signal.

A query is identified by its *canonical id*, a keyed hash of the sample's back-stage inputs
(what the private tier receives). The FP16 activation bytes themselves are not a stable
identity: the front stage's float arithmetic depends on the batch a sample travels in (on the
digits model, 16% of samples differ in at least one FP16 element between a batch of one and a
batch of 1,797). So each float input is reduced to ``PROJECTIONS`` keyed random (+-1)
projections of its unit-normalised values, each quantised to cells of width ``CELL`` with a
keyed offset; integer and boolean inputs count byte for byte. On the digits model no canonical
id changed in 5,391 such comparisons (cells of 0.25 changed 1 in 5,400), while distinct inputs
keep distinct ids (3,178 ids for an attacker's 3,250 distinct queries: only near-identical
augmented copies share one). So the same query gets the same answer, and an attacker cannot
average the watermark out by asking again or adding invisible noise.

From the canonical id, one HMAC-SHA256 under its own subkey gives three independent 64-bit
values: selection (a query is selected when the first is below ``fraction * 2**64``), the
offset of its watermark label and the offset of its signal class; an offset names one of the
other classes, ``(top1 + 1 + offset mod (classes - 1)) mod classes``, uniformly.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from private_core.watermark.keys import WatermarkKey

PROJECTIONS = 32
CELL = 0.5
_U64 = 2.0**64
_CACHED_SHAPES = 8


@dataclass(frozen=True)
class QueryMarks:
    """The watermark's decisions for each sample of one request."""

    ids: list[bytes]  # canonical query ids, 32 bytes each
    selected: npt.NDArray[np.bool_]  # label watermark: answer with another class
    offsets: npt.NDArray[np.uint64]  # keyed choice of that class
    signal_offsets: npt.NDArray[np.uint64]  # signal watermark: the class that gains probability


def watermark_labels(
    top1: npt.NDArray[np.int64], offsets: npt.NDArray[np.uint64], classes: int
) -> npt.NDArray[np.int64]:
    """The keyed other class for each sample: never ``top1``, uniform over the rest."""
    if classes < 2:
        raise ValueError("a label watermark needs at least two classes")
    shift = (offsets % np.uint64(classes - 1)).astype(np.int64)
    return np.asarray((top1 + 1 + shift) % classes, dtype=np.int64)


class QueryMarker:
    """Computes ``QueryMarks`` for batches of back-stage inputs under one key."""

    def __init__(
        self, key: WatermarkKey, fraction: float, projections: int = PROJECTIONS, cell: float = CELL
    ) -> None:
        self.fraction, self.projections, self.cell = fraction, projections, cell
        self._id_key = key.derive("splitvault/watermark/query-id")
        self._projection_seed = key.derive("splitvault/watermark/projection")
        self._decision_key = key.derive("splitvault/watermark/decisions")
        self._projections: dict[tuple[str, int], tuple[torch.Tensor, np.ndarray]] = {}
        self._lock = threading.Lock()

    def marks(self, inputs: Mapping[str, Any]) -> QueryMarks:
        """Decisions for every sample (first dimension) of ``inputs``."""
        ids = self.query_ids(inputs)
        digests = b"".join(hmac.digest(self._decision_key, qid, "sha256") for qid in ids)
        values = np.frombuffer(digests, dtype=">u8").reshape(len(ids), 4).astype(np.uint64)
        return QueryMarks(
            ids=ids,
            selected=values[:, 0] < np.uint64(min(int(self.fraction * _U64), 2**64 - 1)),
            offsets=values[:, 1].copy(),
            signal_offsets=values[:, 2].copy(),
        )

    def query_ids(self, inputs: Mapping[str, Any]) -> list[bytes]:
        """The canonical id of each sample."""
        names = sorted(inputs)
        if not names:
            return []
        arrays = {name: np.asarray(inputs[name]) for name in names}
        count = len(arrays[names[0]])
        parts: list[list[bytes]] = [[] for _ in range(count)]
        for name in names:
            for row, piece in enumerate(self._canonical_rows(name, arrays[name])):
                parts[row].append(piece)
        return [hmac.digest(self._id_key, b"".join(row), "sha256") for row in parts]

    def _canonical_rows(self, name: str, array: np.ndarray) -> list[bytes]:
        head = name.encode() + b"\0" + repr(array.shape[1:]).encode() + b"\0"
        if array.dtype.kind != "f":
            flat = np.ascontiguousarray(array.reshape(len(array), -1))
            tag = head + b"i" + array.dtype.str.encode() + b"\0"
            return [tag + row.tobytes() for row in flat]
        flat = array.reshape(len(array), -1)
        if not flat.flags.writeable:  # a view of the request bytes; torch wants its own
            flat = flat.copy()
        values = torch.from_numpy(flat).to(torch.float64)  # torch: fast FP16 and tier threads
        signs, offsets = self._projection(name, values.shape[1])
        norms = values.norm(dim=1, keepdim=True)
        scaled = torch.where(norms > 0, values / norms.clamp_min(1e-300), 0.0)
        projected = (scaled @ signs).numpy()
        cells = np.floor(projected / self.cell + offsets).astype("<i8")
        return [head + b"f" + row.tobytes() for row in cells]

    def _projection(self, name: str, size: int) -> tuple[torch.Tensor, np.ndarray]:
        """Keyed +-1 projection matrix (size, projections) and cell offsets, from SHAKE-256."""
        with self._lock:
            cached = self._projections.get((name, size))
        if cached is None:
            stream = hashlib.shake_256(
                self._projection_seed + name.encode() + b"\0" + size.to_bytes(8, "big")
            ).digest(size * PROJECTIONS // 8 + 8 * PROJECTIONS)
            bits = np.unpackbits(np.frombuffer(stream, np.uint8))[: size * PROJECTIONS]
            signs = bits.reshape(size, PROJECTIONS)[:, : self.projections] * 2.0 - 1.0
            raw = np.frombuffer(stream[-8 * PROJECTIONS :], dtype=">u8").astype(np.float64)
            cached = (torch.from_numpy(signs), raw[: self.projections] / _U64)
            with self._lock:
                if len(self._projections) >= _CACHED_SHAPES:
                    self._projections.pop(next(iter(self._projections)))
                self._projections[(name, size)] = cached
        return cached
