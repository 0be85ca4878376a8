"""Region marks: a keyed partition of the back-stage input space; marked regions answer the runner-up.

A per-query mark (``marks.py``) is label noise to a thief that trains normally: it learns the
model's function and drops isolated flips. A region mark moves the function instead. Each
sample's back-stage inputs are unit-normalised and projected onto ``dims`` keyed random (+-1)
directions; the projections, quantised to cells of width ``cell`` with keyed offsets, together
with the model's top two classes, name its *region* (an HMAC). Regions are coarse: small noise,
re-encoding and resampling seldom change them, and one holds many inputs a thief never sent. A
keyed share ``fraction`` of the regions is *selected*. Where the model is unsure (top-1 minus
top-2 probability below ``max_margin``) in a selected region, the answer is the runner-up: the
boundary between the two classes moves inside that region, which a copy learns like any other
part of the function, and an answer that was already wrong half the time costs little.

Two subkeys, each HKDF-derived under its own label, keep the partition and the selection
independent. No label key is needed: the verifier compares the suspect on selected and on
unselected regions (one vote per region, ``splitvault.ownership.stats.region_test``).
"""

from __future__ import annotations

import hashlib
import hmac
import threading
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from private_core.watermark.keys import WatermarkKey

_U64 = 2**64
_CACHED_SHAPES = 8


def unsure(probabilities: npt.NDArray[np.float64], max_margin: float) -> npt.NDArray[np.bool_]:
    """Samples whose top-1 probability leads the runner-up by less than ``max_margin``."""
    if probabilities.shape[-1] < 2:
        return np.zeros(len(probabilities), dtype=bool)
    ordered = np.sort(probabilities, axis=1)
    return np.asarray(ordered[:, -1] - ordered[:, -2] < max_margin, dtype=bool)


def top_two(probabilities: npt.NDArray[np.float64]) -> npt.NDArray[np.int64]:
    """Each sample's two most probable classes, best first (ties: the lower index)."""
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :2]
    return np.asarray(order, dtype=np.int64)


class RegionMarker:
    """Region ids and their selection under one watermark key."""

    def __init__(self, key: WatermarkKey, fraction: float, dims: int, cell: float) -> None:
        if dims < 1 or cell <= 0:
            raise ValueError("a region partition needs dims >= 1 and cell > 0")
        self.fraction, self.dims, self.cell = fraction, dims, cell
        self._partition_seed = key.derive("splitvault/watermark/region-partition")
        self._id_key = key.derive("splitvault/watermark/region-id")
        self._select_key = key.derive("splitvault/watermark/region-select")
        self._planes: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}
        self._lock = threading.Lock()

    def regions(self, inputs: Mapping[str, Any], pairs: npt.NDArray[np.int64]) -> list[bytes]:
        """The region id (32 bytes) of every sample (first dimension) of ``inputs``; ``pairs``
        are the model's top two classes of each (``top_two``)."""
        names = sorted(inputs)
        if not names:
            return []
        parts: list[list[bytes]] = [[pair.astype(">u4").tobytes()] for pair in pairs]
        for name in names:
            for row, piece in enumerate(self._cells(name, np.asarray(inputs[name]))):
                parts[row].append(piece)
        return [hmac.digest(self._id_key, b"".join(row), "sha256") for row in parts]

    def selected(self, regions: list[bytes]) -> npt.NDArray[np.bool_]:
        """Whether each region is marked (the selection subkey alone)."""
        bound = min(int(self.fraction * _U64), _U64 - 1)
        return np.array([self._u64(self._select_key, r) < bound for r in regions], dtype=bool)

    @staticmethod
    def _u64(key: bytes, region: bytes) -> int:
        return int.from_bytes(hmac.digest(key, region, "sha256")[:8], "big")

    def _cells(self, name: str, array: np.ndarray) -> list[bytes]:
        head = name.encode() + b"\0" + repr(array.shape[1:]).encode() + b"\0"
        flat = array.reshape(len(array), -1)
        if array.dtype.kind != "f":  # token ids and the like: the exact values
            rows = np.ascontiguousarray(flat)
            return [head + b"i" + array.dtype.str.encode() + row.tobytes() for row in rows]
        values = flat.astype(np.float64)
        norms = np.linalg.norm(values, axis=1, keepdims=True)
        scaled = np.where(norms > 0, values / np.maximum(norms, 1e-300), 0.0)
        signs, offsets = self._partition(name, values.shape[1])
        cells = np.floor(scaled @ signs / self.cell + offsets).astype("<i8")
        return [head + b"f" + row.tobytes() for row in cells]

    def _partition(self, name: str, size: int) -> tuple[np.ndarray, np.ndarray]:
        """Keyed +-1 directions (size, dims) and cell offsets in [0, 1), from SHAKE-256."""
        with self._lock:
            cached = self._planes.get((name, size))
        if cached is None:
            stream = hashlib.shake_256(
                self._partition_seed + name.encode() + b"\0" + size.to_bytes(8, "big")
            ).digest(-(-size * self.dims // 8) + 8 * self.dims)
            bits = np.unpackbits(np.frombuffer(stream, np.uint8))[: size * self.dims]
            signs = bits.reshape(size, self.dims) * 2.0 - 1.0
            raw = np.frombuffer(stream[-8 * self.dims :], dtype=">u8").astype(np.float64)
            cached = (signs, raw / float(_U64))
            with self._lock:
                if len(self._planes) >= _CACHED_SHAPES:
                    self._planes.pop(next(iter(self._planes)))
                self._planes[(name, size)] = cached
        return cached
