"""Per-stream state of the activation monitor: two CUSUM statistics, a level and a window of
recent rows (in a random projection) for the near-duplicate test. Pure NumPy, no I/O."""

from __future__ import annotations

import functools
import math
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from private_core.monitor_settings import ActivationMonitorSettings

OK, ALERT, REFUSE = 0, 1, 2
LEVEL_NAMES = ("ok", "alert", "refuse")
Floats = npt.NDArray[np.float32]
Bools = npt.NDArray[np.bool_]
SHORT_CUSUM = 8  # steps below which the recursion beats the vectorised form
FEW_ROWS = 4  # rows up to which the near-duplicate test uses differences, not products
# A float32 squared distance |w|^2 - 2 w.r + |r|^2 of 32-wide rows is off by less than
# 40 * 2^-24 * (|w|^2 + |r|^2); this margin is 25 times that.
SCREEN_MARGIN = 1e-4


@dataclass(frozen=True)
class RowEvidence:
    """One request's analysed rows: scores, outlier flags, projections, and how many rows of
    the request each analysed row stands for (``weight`` >= 1 when rows were sampled)."""

    scores: Floats
    outliers: Bools
    projected: Floats
    scales: Floats  # per row: the distance unit of the near-duplicate test
    weight: float
    unit: float | None = None  # the unit when every row has the same (a profile's)
    probes: Floats | None = None  # ``probes_of(projected)``, when the scorer made them

    def part(self, start: int, stop: int, weight: float) -> RowEvidence:
        """Rows ``start:stop`` (one request of a group scored together), with its weight."""
        return RowEvidence(
            self.scores[start:stop],
            self.outliers[start:stop],
            self.projected[start:stop],
            self.scales[start:stop],
            weight,
            self.unit,
            None if self.probes is None else self.probes[start:stop],
        )


def probes_of(projected: Floats) -> Floats:
    """(n, P + 2): each row as ``-2 r``, 1 and its squared norm: one product with a stream's
    table (rows and their squared norms) gives ``|w|^2 - 2 w.r`` for every window row."""
    probes = np.empty((len(projected), projected.shape[1] + 2), np.float32)
    np.multiply(projected, -2.0, out=probes[:, :-2])
    probes[:, -2] = 1.0
    np.einsum("ij,ij->i", projected, projected, out=probes[:, -1])
    return probes


@dataclass
class Stream:
    """One (scope, name, model) stream: statistics, level and recent rows.

    ``norms`` holds each window row's squared norm (+inf while the slot is empty), next to the
    row in ``table``, so that a one-row request is screened for near duplicates by one float32
    product (``fold_one``); ``largest`` bounds them, for that screen's rounding margin."""

    window: Floats
    norms: Floats = field(default_factory=lambda: np.zeros(0, np.float32))
    table: Floats = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    largest: float = 0.0
    shift: float = 0.0
    rows: float = 0.0
    level: int = OK
    seen: float = 0.0
    outliers: float = 0.0
    near: float = 0.0
    filled: int = 0
    head: int = 0
    reasons: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        table = np.empty((len(self.window), self.window.shape[1] + 1), np.float32)
        table[:, :-1] = self.window
        table[:, -1] = np.inf
        self.table, self.window, self.norms = table, table[:, :-1], table[:, -1]

    def near_duplicates(self, evidence: RowEvidence, settings: ActivationMonitorSettings) -> Bools:
        """Rows within the near band of a recent row or of another row of this request."""
        low: float | npt.NDArray[np.float64]
        high: float | npt.NDArray[np.float64]
        if evidence.unit is not None:  # plain floats: a few rows are the common case
            low, high = (
                (settings.near_low * evidence.unit) ** 2,
                (settings.near_high * evidence.unit) ** 2,
            )
        else:
            scales = evidence.scales.astype(np.float64)[:, None]
            low, high = (
                np.square(settings.near_low * scales),
                np.square(settings.near_high * scales),
            )
        if len(evidence.projected) <= FEW_ROWS:
            squared = self._distances_of_few(evidence.projected)
        else:
            squared = self._distances(evidence.projected)
        near = ((squared >= low) & (squared < high)).any(axis=1)
        return np.asarray(near)

    def _distances_of_few(self, rows: Floats) -> npt.NDArray[np.float64]:
        """Squared distances of a few rows to the window's filled slots and to each other, from
        the differences (float32 differences are exact enough: a repeat is exactly 0)."""
        recent = self.window[: self.filled] if self.filled < len(self.window) else self.window
        others = recent if len(rows) == 1 else np.concatenate([recent, rows])
        differences = others[None, :, :] - rows[:, None, :]
        squared = np.asarray(np.einsum("ijk,ijk->ij", differences, differences), np.float64)
        if len(rows) > 1:  # not a row against itself
            squared[np.arange(len(rows)), len(recent) + np.arange(len(rows))] = np.inf
        return squared

    def _distances(self, projected: Floats) -> npt.NDArray[np.float64]:
        """The same for many rows, as matrix products (float64: a repeat, distance 0, must not
        land in the band through rounding); +inf against empty window slots."""
        rows = projected.astype(np.float64)
        lengths = np.einsum("ij,ij->i", rows, rows)
        window = self.window.astype(np.float64)
        norms = np.einsum("ij,ij->i", window, window)
        norms[self.filled :] = np.inf  # slots fill in order: the empty ones are never in the band
        squared = rows @ window.T
        squared *= -2.0
        squared += lengths[:, None]
        squared += norms
        own = lengths[:, None] + lengths[None, :] - 2.0 * rows @ rows.T
        np.fill_diagonal(own, np.inf)
        return np.concatenate([squared, own], axis=1)

    def remember(self, projected: Floats) -> None:
        """Add rows to the ring window (with their squared norms)."""
        size = len(self.window)
        if size == 0:
            return
        if len(projected) == 1:  # the common case, without index arrays
            row = projected[0]
            self._remember_one(row, float(np.dot(row, row)))
            return
        rows = projected[-size:]
        slots = (self.head + np.arange(len(rows))) % size
        self.window[slots] = rows
        self.norms[slots] = lengths = np.einsum("ij,ij->i", rows, rows)
        self.largest = max(self.largest, float(lengths.max()))
        self.head = int(slots[-1] + 1) % size
        self.filled = min(self.filled + len(rows), size)

    def _remember_one(self, row: Floats, length: float) -> None:
        size = len(self.window)
        if size == 0:
            return
        self.window[self.head] = row
        self.norms[self.head] = length
        self.largest = max(self.largest, length)
        self.head = (self.head + 1) % size
        self.filled = min(self.filled + 1, size)

    def update(
        self, evidence: RowEvidence, near: Bools, settings: ActivationMonitorSettings
    ) -> int:
        """Fold one request's rows into the statistics; the new level (never lower)."""
        weight = evidence.weight
        hit, miss = _log_ratios(settings)
        shifts: npt.NDArray[np.floating[Any]] | list[float]
        steps: npt.NDArray[np.floating[Any]] | list[float]
        if len(near) <= SHORT_CUSUM:  # plain Python: cheaper than NumPy for a few rows
            cap, drift = settings.shift_cap, settings.shift_drift
            outliers, nears = evidence.outliers.tolist(), near.tolist()
            shifts = [weight * (min(score, cap) - drift) for score in evidence.scores.tolist()]
            steps = [
                weight * (hit if o or n else miss) for o, n in zip(outliers, nears, strict=True)
            ]
            outlying, nearby = sum(outliers), sum(nears)
        else:
            shifts = weight * (
                np.minimum(evidence.scores, settings.shift_cap) - settings.shift_drift
            )
            steps = weight * np.where(evidence.outliers | near, hit, miss)
            outlying = int(np.count_nonzero(evidence.outliers))
            nearby = int(np.count_nonzero(near))
        self.shift, shift_peak = cusum(self.shift, shifts)
        self.rows, rows_peak = cusum(self.rows, steps)
        self.seen += weight * len(near)
        self.outliers += weight * outlying
        self.near += weight * nearby
        self.level = max(self.level, level_of(shift_peak, rows_peak, settings))
        if self.level == REFUSE:  # sticky: its rows are no longer needed
            self._forget()
        return self.level

    def fold_one(
        self,
        evidence: RowEvidence,
        settings: ActivationMonitorSettings,
        ratios: tuple[float, float],
    ) -> None:
        """``near_duplicates``, ``update`` and ``remember`` of a one-row request (``ratios``:
        ``log_ratios(settings)``), on scalars; the same statistics and level."""
        row = evidence.projected[0]
        probe = probes_of(evidence.projected)[0] if evidence.probes is None else evidence.probes[0]
        length = float(probe[-1])
        near = self._near_one(probe[:-1], length, evidence, settings)
        weight, score, outlier = evidence.weight, float(evidence.scores[0]), evidence.outliers[0]
        shift = max(
            0.0, self.shift + weight * (min(score, settings.shift_cap) - settings.shift_drift)
        )
        rows = max(0.0, self.rows + weight * (ratios[0] if outlier or near else ratios[1]))
        shift_peak, rows_peak = max(self.shift, shift), max(self.rows, rows)
        self.shift, self.rows = shift, rows
        self.seen += weight
        self.outliers += weight * bool(outlier)
        self.near += weight * near
        self.level = max(self.level, level_of(shift_peak, rows_peak, settings))
        if self.level == REFUSE:
            self._forget()
        else:
            self._remember_one(row, length)

    def _near_one(
        self,
        probe: Floats,
        length: float,
        evidence: RowEvidence,
        settings: ActivationMonitorSettings,
    ) -> bool:
        """Whether one row is a near duplicate: a float32 product screens the window, and only a
        row it finds within the band plus its rounding margin gets the exact test."""
        if self.filled == 0:
            return False
        # |w|^2 - 2 w.r per window row (+inf where the slot is empty), plus |r|^2.
        closest = float(np.minimum.reduce(self.table @ probe)) + length
        unit = evidence.unit if evidence.unit is not None else float(evidence.scales[0])
        margin = SCREEN_MARGIN * (self.largest + length)
        if closest >= (settings.near_high * unit) ** 2 + margin:
            return False
        return bool(self.near_duplicates(evidence, settings)[0])

    def _forget(self) -> None:
        """Drop the window (a refused stream is sticky: its rows are no longer needed)."""
        self.window, self.filled, self.head = self.window[:0], 0, 0
        self.norms, self.table = self.norms[:0], self.table[:0]

    def reason(self) -> dict[str, float]:
        """What the stream's statistics say, for the alert log."""
        return {
            "shift": round(self.shift, 2),
            "rows": round(self.rows, 2),
            "samples": round(self.seen),
            "outlier_share": round(self.outliers / max(self.seen, 1.0), 4),
            "near_duplicate_share": round(self.near / max(self.seen, 1.0), 4),
        }


def cusum(start: float, steps: npt.NDArray[np.floating[Any]] | list[float]) -> tuple[float, float]:
    """Page's CUSUM ``s = max(0, s + step)`` over ``steps`` from ``start``: (end, peak).

    Vectorised: with ``c`` the running sum, ``s_i = c_i - min(-start, min_{j<=i} c_j)``;
    a few steps (single-row requests) are cheaper as the plain recursion.
    """
    if len(steps) <= SHORT_CUSUM:
        state = peak = start
        for step in steps if isinstance(steps, list) else steps.tolist():
            state = max(0.0, state + step)
            peak = max(peak, state)
        return state, peak
    running = np.cumsum(steps, dtype=np.float64)
    path = running - np.minimum.accumulate(np.minimum(running, -start))
    return float(path[-1]), float(path.max())


def log_ratios(settings: ActivationMonitorSettings) -> tuple[float, float]:
    """Log-likelihood ratios of a suspect row and of a clean one (crafted against benign)."""
    return _log_ratios(settings)


@functools.lru_cache(maxsize=8)
def _log_ratios(settings: ActivationMonitorSettings) -> tuple[float, float]:
    """Log-likelihood ratios of a suspect row and of a clean one (crafted against benign)."""
    hit = math.log(settings.crafted_rate / settings.benign_rate)
    miss = math.log((1 - settings.crafted_rate) / (1 - settings.benign_rate))
    return hit, miss


def level_of(shift: float, rows: float, settings: ActivationMonitorSettings) -> int:
    """The level the two statistics reach."""
    if shift >= settings.shift_refuse or rows >= settings.rows_refuse:
        return REFUSE
    if shift >= settings.shift_alert or rows >= settings.rows_alert:
        return ALERT
    return OK


class StreamTable:
    """Streams by key, at most ``limit`` below the refusal level: the least recently used one
    goes first, an alerted one only when none is below alert. Refused streams (without their
    window: a few hundred bytes) are kept up to 100 times ``limit``, so new names cannot wash
    out a refusal."""

    def __init__(self, limit: int, width: int, window: int) -> None:
        self._streams: OrderedDict[Hashable, Stream] = OrderedDict()
        self._limit, self._width, self._window = limit, width, window

    def get(self, key: Hashable) -> Stream:
        """The stream for ``key``, created when new."""
        stream = self._streams.get(key)
        if stream is not None:
            self._streams.move_to_end(key)
            return stream
        if len(self._streams) >= self._limit:
            self._evict()
        stream = Stream(window=np.zeros((self._window, self._width), np.float32))
        self._streams[key] = stream
        return stream

    def peek(self, key: Hashable) -> Stream | None:
        """The stream for ``key`` if it exists (not marked as used)."""
        return self._streams.get(key)

    def __len__(self) -> int:
        return len(self._streams)

    def _evict(self) -> None:
        refused = sum(stream.level == REFUSE for stream in self._streams.values())
        if len(self._streams) - refused < self._limit and refused < 100 * self._limit:
            return
        for wanted in (OK, ALERT, REFUSE):
            for key, stream in self._streams.items():
                if stream.level == wanted:
                    del self._streams[key]
                    return
