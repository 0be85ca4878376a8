"""Per-key monitor state: bounded arrays, serialized as JSON plus raw array bytes (no pickle).

A key's state holds one ``ModelState`` per model it queried (the set of deployed models bounds
their number) and the key's current verdict. Every array has a fixed upper size set by the
``MonitorConfig``, so a key that sent ten million queries takes no more room than one that sent
two thousand:

* PRADA: a reservoir of past queries per predicted-class bucket (float16) and a reservoir of
  their minimum distances;
* repeats: a ring of 64-bit hashes of recent queries;
* coverage: counts per class bucket and a bitmap of the activation-grid cells visited;
* volume: queries per hour over the last week (a ring of hourly counts);
* OOD: how many analysed queries lay beyond the reference threshold.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from public_api.monitor.store import UnreadableState, level_of

STATE_VERSION = 1
HOURS = 168  # the volume ring: one week of hourly counts


@dataclass
class ModelState:
    """What the monitor remembers of one key's queries to one model."""

    queries: int = 0
    repeats: int = 0
    analysed: int = 0
    ood: int = 0
    space: str = ""  # PRADA space: "input" (the request itself) or "pca" (front activations)
    reservoir: npt.NDArray[np.float16] = field(
        default_factory=lambda: np.zeros((0, 0, 0), np.float16)
    )
    seen: npt.NDArray[np.int64] = field(default_factory=lambda: np.zeros(0, np.int64))
    distances: npt.NDArray[np.float32] = field(default_factory=lambda: np.zeros(0, np.float32))
    distance_count: int = 0
    hashes: npt.NDArray[np.uint64] = field(default_factory=lambda: np.zeros(0, np.uint64))
    hash_count: int = 0
    labels: npt.NDArray[np.int64] = field(default_factory=lambda: np.zeros(0, np.int64))
    cells: npt.NDArray[np.uint8] = field(default_factory=lambda: np.zeros(0, np.uint8))
    hours: npt.NDArray[np.int32] = field(default_factory=lambda: np.zeros(HOURS, np.int32))
    last_hour: int = 0
    prada_w: float | None = None  # Shapiro-Wilk W, recomputed every few new distances
    prada_w_at: int = 0
    score: float = 0.0
    reasons: list[str] = field(default_factory=list)

    @property
    def unique(self) -> int:
        """Queries that were not exact repeats of a recent one."""
        return self.queries - self.repeats

    def window(self) -> npt.NDArray[np.float32]:
        """The PRADA distances kept (a uniform sample of all of them)."""
        return self.distances[: min(self.distance_count, len(self.distances))]


_SCALARS = (
    "queries",
    "repeats",
    "analysed",
    "ood",
    "space",
    "distance_count",
    "hash_count",
    "last_hour",
    "prada_w",
    "prada_w_at",
    "score",
    "reasons",
)
_ARRAYS = ("reservoir", "seen", "distances", "hashes", "labels", "cells", "hours")


@dataclass
class KeyState:
    """A key's verdict and its per-model statistics."""

    level: str = "ok"
    score: float = 0.0
    reasons: list[str] = field(default_factory=list)
    updated_at: float = 0.0
    logged_at: float = float("-inf")
    logged_level: str = ""
    models: dict[str, ModelState] = field(default_factory=dict)

    @property
    def queries(self) -> int:
        """All queries of this key, every model together."""
        return sum(model.queries for model in self.models.values())

    def to_bytes(self) -> bytes:
        """Serialize: the scalars as JSON, then the raw bytes of every array (see ``pack``)."""
        meta: dict[str, Any] = {
            "version": STATE_VERSION,
            "level": self.level,
            "score": self.score,
            "reasons": self.reasons,
            "updated_at": self.updated_at,
            "logged_at": self.logged_at if np.isfinite(self.logged_at) else None,
            "logged_level": self.logged_level,
            "queries": self.queries,
            "models": {
                name: {key: getattr(model, key) for key in _SCALARS}
                for name, model in self.models.items()
            },
        }
        arrays = {
            f"{name}/{key}": getattr(model, key)
            for name, model in self.models.items()
            for key in _ARRAYS
        }
        return pack(meta, arrays)


def pack(meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> bytes:
    """``[u32 header length][JSON header][array bytes...]``: no pickle, no zip overhead.

    The header holds ``meta`` and, per array, its dtype, shape and byte range.
    """
    layout, chunks, offset = {}, [], 0
    for name, array in arrays.items():
        data = np.ascontiguousarray(array).tobytes()
        layout[name] = [array.dtype.str, list(array.shape), offset, len(data)]
        chunks.append(data)
        offset += len(data)
    header = json.dumps({"meta": meta, "arrays": layout}, separators=(",", ":")).encode()
    return b"".join([struct.pack("<I", len(header)), header, *chunks])


def unpack(data: bytes) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Read what ``pack`` wrote (the arrays are copies, safe to change)."""
    header, body = _split(data)
    arrays = {}
    for name, (dtype, shape, offset, size) in header["arrays"].items():
        if np.dtype(dtype).hasobject:
            raise ValueError(f"monitor state array {name!r} has an object dtype")
        flat = np.frombuffer(
            body, dtype=dtype, count=size // np.dtype(dtype).itemsize, offset=offset
        )
        arrays[name] = flat.reshape(shape).copy()
    return header["meta"], arrays


def _split(data: bytes) -> tuple[dict[str, Any], bytes]:
    if len(data) < 4:
        raise ValueError("monitor state is truncated")
    (length,) = struct.unpack_from("<I", data)
    header: dict[str, Any] = json.loads(data[4 : 4 + length])
    if header.get("meta", {}).get("version") != STATE_VERSION:
        raise ValueError(f"monitor state version is not {STATE_VERSION}")
    return header, data[4 + length :]


def read_meta(data: bytes) -> dict[str, Any]:
    """Only the scalar part of a serialized state (cheap: the arrays are not read)."""
    meta: dict[str, Any] = _split(data)[0]["meta"]
    return meta


def load_state(data: bytes | None) -> KeyState:
    """The stored state (a fresh one for None); ``UnreadableState`` if it does not decode or
    names no known level, so that it is never taken for a fresh "ok" state."""
    if data is None:
        return KeyState()
    try:
        state = key_state_from_bytes(data)
        level_of(state.level)
    except (ValueError, KeyError, TypeError, OSError) as error:
        raise UnreadableState(str(error)) from error
    return state


def key_state_from_bytes(data: bytes) -> KeyState:
    """Rebuild a ``KeyState`` written by ``KeyState.to_bytes``."""
    meta, arrays = unpack(data)
    models = {}
    for name, scalars in meta["models"].items():
        model = ModelState(**scalars)
        for key in _ARRAYS:
            setattr(model, key, arrays[f"{name}/{key}"])
        models[name] = model
    logged_at = meta["logged_at"]
    return KeyState(
        level=meta["level"],
        score=float(meta["score"]),
        reasons=list(meta["reasons"]),
        updated_at=float(meta["updated_at"]),
        logged_at=float("-inf") if logged_at is None else float(logged_at),
        logged_level=meta["logged_level"],
        models=models,
    )
