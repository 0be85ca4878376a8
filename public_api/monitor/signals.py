"""The monitor's signals: how each query updates a key's state and what the state says.

``record_*`` functions update a ``ModelState`` in place with bounded work; ``*_signal``
functions turn the state into a value in [0, 1] with a human-readable reason.

* PRADA (Juuti et al., 2019): per predicted class, the minimum L2 distance of each new query to
  that class's earlier queries; natural queries give roughly normal distances, crafted ones
  (small steps around a few seeds) do not, so a low Shapiro-Wilk W flags a synthetic stream.
  Both the earlier queries and the distances are uniform reservoir samples of the key's whole
  history, so the test sees what PRADA's unbounded sets would, in fixed memory.
* Label coverage: the effective number of classes (exp of the label entropy) against the
  number of classes (the highest seen + 1): an extraction attacker spreads evenly, most users
  do not.
* Activation coverage: the share of the reference profile's occupied grid cells visited.
* Volume: unique queries over the key's life, and a burst against the key's own history.
* OOD: the share of queries whose front activations lie beyond the reference threshold
  (augmented or synthetic inputs), as a lower confidence bound so a few unlucky ones in a
  small sample do not count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
import numpy.typing as npt

from public_api.monitor.config import MonitorConfig
from public_api.monitor.profile import ReferenceProfile
from public_api.monitor.state import HOURS, ModelState

RECENT_HOURS = 2
PRADA_EVERY = 8


@dataclass(frozen=True)
class Signal:
    """One signal's value in [0, 1] and why."""

    name: str
    value: float
    reason: str


def ramp(value: float, low: float, high: float) -> float:
    """0 at or below ``low``, 1 at or above ``high``, linear between."""
    if high <= low:
        return float(value >= high)
    return float(min(1.0, max(0.0, (value - low) / (high - low))))


def record_repeats(
    state: ModelState, hashes: npt.NDArray[np.uint64], window: int
) -> npt.NDArray[np.bool_]:
    """Mark which queries are new (not in the ring of recent hashes) and remember them."""
    if len(state.hashes) != window:
        state.hashes, state.hash_count = np.zeros(window, np.uint64), 0
    fresh = ~np.isin(hashes, state.hashes[: min(state.hash_count, window)])
    first = np.zeros(len(hashes), dtype=bool)
    first[np.unique(hashes, return_index=True)[1]] = True
    fresh &= first  # a sample sent twice in one batch is new once
    for value in hashes[fresh]:
        state.hashes[state.hash_count % window] = value
        state.hash_count += 1
    state.repeats += int(np.count_nonzero(~fresh))
    return fresh


def record_hours(state: ModelState, now: float, count: int) -> None:
    """Add ``count`` queries to the hourly ring at time ``now``."""
    hour = int(now // 3600)
    if state.queries == 0 or hour - state.last_hour >= HOURS:
        state.hours[:] = 0
    elif hour > state.last_hour:
        for past in range(state.last_hour + 1, hour + 1):
            state.hours[past % HOURS] = 0
    state.last_hour = max(hour, state.last_hour)
    state.hours[state.last_hour % HOURS] += count


def record_labels(state: ModelState, labels: npt.NDArray[np.int64], buckets: int) -> None:
    """Count predicted classes (class ``c`` goes to bucket ``c % buckets``)."""
    folded = np.mod(labels.astype(np.int64), buckets)
    size = max(len(state.labels), int(folded.max()) + 1)
    if size > len(state.labels):
        state.labels = np.pad(state.labels, (0, size - len(state.labels)))
    np.add.at(state.labels, folded, 1)


def record_cells(state: ModelState, cells: npt.NDArray[np.int64], total: int) -> None:
    """Set the visited bits of activation-grid cells."""
    if len(state.cells) != (total + 7) // 8:
        state.cells = np.zeros((total + 7) // 8, np.uint8)
    bits = np.unpackbits(state.cells, count=total)
    bits[cells] = 1
    state.cells = np.packbits(bits)


def record_ood(state: ModelState, distances: npt.NDArray[np.float32], threshold: float) -> None:
    """Count analysed queries and those beyond the reference threshold."""
    state.analysed += len(distances)
    state.ood += int(np.count_nonzero(distances > threshold))


def record_prada(
    state: ModelState,
    vectors: npt.NDArray[np.float32],
    buckets: npt.NDArray[np.int64],
    config: MonitorConfig,
    rng: np.random.Generator,
) -> None:
    """Add each new query's minimum distance to its class's reservoir, then maybe keep it."""
    size, dim = config.reservoir_size, vectors.shape[1]
    if state.reservoir.shape[1:] != (size, dim):
        state.reservoir = np.zeros((0, size, dim), np.float16)
        state.seen = np.zeros(0, np.int64)
    if len(state.distances) != config.distance_reservoir:
        state.distances = np.zeros(config.distance_reservoir, np.float32)
        state.distance_count = 0
    needed = int(buckets.max()) + 1 if len(buckets) else 0
    if needed > len(state.seen):
        extra = needed - len(state.seen)
        state.reservoir = np.concatenate(
            [state.reservoir, np.zeros((extra, size, dim), np.float16)]
        )
        state.seen = np.concatenate([state.seen, np.zeros(extra, np.int64)])
    for bucket in np.unique(buckets):
        rows = vectors[buckets == bucket]
        distances = _min_distances(
            state.reservoir[bucket, : min(int(state.seen[bucket]), size)], rows
        )
        for row, distance in zip(rows, distances, strict=True):
            if distance == 0.0:
                continue  # a repeat the hash ring no longer remembered
            if np.isfinite(distance):
                _keep_distance(state, float(distance), rng)
            _keep(state, row, int(bucket), rng)


def _min_distances(
    held: npt.NDArray[np.float16], rows: npt.NDArray[np.float32]
) -> npt.NDArray[np.float64]:
    """Each row's L2 distance to the nearest of ``held`` and of the rows before it (inf if none)."""
    earlier = np.concatenate([held.astype(np.float32), rows])
    squared: npt.NDArray[np.float64] = np.sum(
        (rows[:, None, :] - earlier[None, :, :]) ** 2, axis=2, dtype=np.float64
    )
    later = np.arange(len(rows))[:, None] <= np.arange(len(rows))[None, :]
    squared[:, len(held) :][later] = np.inf
    return np.asarray(np.sqrt(squared.min(axis=1)), dtype=np.float64)


def _keep(
    state: ModelState, vector: npt.NDArray[np.float32], bucket: int, rng: np.random.Generator
) -> None:
    """Reservoir sampling (Algorithm R): each query of the class is kept with equal chance."""
    seen, size = int(state.seen[bucket]), state.reservoir.shape[1]
    slot = seen if seen < size else int(rng.integers(seen + 1))
    if slot < size:
        state.reservoir[bucket, slot] = vector
    state.seen[bucket] = seen + 1


def _keep_distance(state: ModelState, distance: float, rng: np.random.Generator) -> None:
    """Algorithm R again: the distances kept are a uniform sample of all the key's distances."""
    count, size = state.distance_count, len(state.distances)
    slot = count if count < size else int(rng.integers(count + 1))
    if slot < size:
        state.distances[slot] = distance
    state.distance_count = count + 1


def prada_signal(state: ModelState, config: MonitorConfig) -> Signal | None:
    """Shapiro-Wilk W of the sampled distances; low W = a crafted, non-normal stream.

    W is recomputed once ``PRADA_EVERY`` new distances have arrived (it moves slowly).
    """
    window = state.window()
    if len(window) < config.prada_min_distances or float(np.ptp(window)) == 0.0:
        return None
    if state.prada_w is None or state.distance_count - state.prada_w_at >= PRADA_EVERY:
        from scipy.stats import shapiro  # heavy: imported on first use, not by the CLI

        state.prada_w = float(shapiro(window.astype(np.float64)).statistic)
        state.prada_w_at = state.distance_count
    w = state.prada_w
    value = ramp(config.prada_threshold - w, 0.0, config.prada_threshold - config.prada_floor)
    relation = "<" if w < config.prada_threshold else ">="
    return Signal(
        "prada",
        value,
        f"PRADA: Shapiro-Wilk W={w:.2f} {relation} {config.prada_threshold:.2f} "
        f"over {len(window)} distances",
    )


def wilson_low(successes: int, trials: int, confidence: float) -> float:
    """Lower end of the Wilson score interval of a binomial proportion."""
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    share = successes / trials
    centre = share + z * z / (2 * trials)
    spread = z * math.sqrt(share * (1 - share) / trials + z * z / (4 * trials * trials))
    return max(0.0, (centre - spread) / (1 + z * z / trials))


def ood_signal(
    state: ModelState, profile: ReferenceProfile, config: MonitorConfig
) -> Signal | None:
    """Share of analysed queries beyond the reference threshold, by its lower bound."""
    if state.analysed == 0:
        return None
    low = wilson_low(state.ood, state.analysed, config.ood_confidence)
    share = state.ood / state.analysed
    percentile = f"{profile.ood_quantile * 100:g}th percentile"
    return Signal(
        "ood",
        ramp(low, config.ood_low, config.ood_high),
        f"OOD: {share:.0%} of {state.analysed:,} analysed queries beyond the reference "
        f"{percentile} (at least {low:.0%} at {config.ood_confidence:.0%} confidence)",
    )


def label_signal(state: ModelState, config: MonitorConfig) -> Signal | None:
    """Effective number of classes against the classes seen, once there are enough queries."""
    total = int(state.labels.sum())
    if total < config.labels_min_queries or len(state.labels) < 2:
        return None
    shares = state.labels[state.labels > 0] / total
    effective = math.exp(float(-np.sum(shares * np.log(shares))))
    breadth = effective / len(state.labels)
    seen = int(np.count_nonzero(state.labels))
    return Signal(
        "labels",
        ramp(breadth, config.labels_low, config.labels_high),
        f"coverage: {seen}/{len(state.labels)} classes, {effective:.1f} effective, "
        f"after {state.queries:,} queries",
    )


def cell_signal(
    state: ModelState, profile: ReferenceProfile, config: MonitorConfig
) -> Signal | None:
    """Share of the reference's occupied activation cells this key has visited."""
    if len(state.cells) == 0 or profile.occupied_cells == 0:
        return None
    visited = np.unpackbits(state.cells, count=profile.cells).astype(bool)
    inside = int(np.count_nonzero(visited & (profile.cell_counts > 0)))
    share = inside / profile.occupied_cells
    return Signal(
        "cells",
        ramp(share, config.cells_low, config.cells_high),
        f"coverage: {share:.0%} of activation cells after {state.queries:,} queries "
        f"(and {int(np.count_nonzero(visited)) - inside} cells outside the reference)",
    )


def volume_signal(state: ModelState, now: float, config: MonitorConfig) -> Signal:
    """Unique queries over the key's life and the last two hours against its own history."""
    lifetime = ramp(
        math.log(max(state.unique, 1)), math.log(config.volume_low), math.log(config.volume_high)
    )
    hour = int(now // 3600)
    recent_slots = [h % HOURS for h in range(hour - RECENT_HOURS + 1, hour + 1)]
    recent = int(state.hours[recent_slots].sum()) if hour - state.last_hour < HOURS else 0
    earlier = np.delete(state.hours, recent_slots)
    active = earlier[earlier > 0]
    median = float(np.median(active)) if len(active) else 0.0
    base = max(config.burst_floor, config.burst_factor * median * RECENT_HOURS)
    burst = ramp(recent, base, 4 * base)
    history = f"the key's median {median:,.0f}/h before" if len(active) else "no earlier activity"
    return Signal(
        "volume",
        max(lifetime, burst),
        f"volume: {state.unique:,} unique queries in total, {recent:,} in the last "
        f"{RECENT_HOURS} h vs {history}",
    )
