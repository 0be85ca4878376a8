"""One monitor state for a key group: its members' evidence added up, so that ten keys of two
thousand queries each are scored like one key of twenty thousand.

Per model: counts (queries, repeats, analysed, OOD) are summed, label counts summed, visited
activation cells united, hourly volumes added hour by hour, and the PRADA distances kept are a
sample of every member's, in proportion to how many each member measured. Only what the
signals read is merged (the query reservoirs and repeat hashes are for recording, not scoring).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from public_api.monitor.state import HOURS, KeyState, ModelState

__all__ = ["merge_states"]


def merge_states(states: Sequence[KeyState], distances: int, seed: int) -> KeyState:
    """The union of ``states``' evidence; ``distances`` PRADA distances kept at most."""
    rng = np.random.default_rng(seed)
    merged = KeyState()
    for name in sorted({name for state in states for name in state.models}):
        parts = [state.models[name] for state in states if name in state.models]
        merged.models[name] = _merge_model(parts, distances, rng)
    return merged


def _merge_model(parts: Sequence[ModelState], size: int, rng: np.random.Generator) -> ModelState:
    merged = ModelState(
        queries=sum(part.queries for part in parts),
        repeats=sum(part.repeats for part in parts),
        analysed=sum(part.analysed for part in parts),
        ood=sum(part.ood for part in parts),
    )
    spaces = Counter(part.space for part in parts if part.space)
    merged.space = spaces.most_common(1)[0][0] if spaces else ""
    merged.labels = _sum_padded([part.labels for part in parts])
    merged.cells = _union_bits([part.cells for part in parts])
    merged.hours, merged.last_hour = _merge_hours(parts)
    same_space = [part for part in parts if part.space == merged.space]
    merged.distances, merged.distance_count = _merge_distances(same_space, size, rng)
    return merged


def _sum_padded(arrays: Sequence[npt.NDArray[np.int64]]) -> npt.NDArray[np.int64]:
    total = np.zeros(max((len(a) for a in arrays), default=0), np.int64)
    for array in arrays:
        total[: len(array)] += array
    return total


def _union_bits(arrays: Sequence[npt.NDArray[np.uint8]]) -> npt.NDArray[np.uint8]:
    union = np.zeros(max((len(a) for a in arrays), default=0), np.uint8)
    for array in arrays:
        union[: len(array)] |= array
    return union


def _merge_hours(parts: Sequence[ModelState]) -> tuple[npt.NDArray[np.int32], int]:
    """Hourly counts added for the same absolute hour, within the week up to the latest."""
    active = [part for part in parts if part.queries > 0]
    latest = max((part.last_hour for part in active), default=0)
    hours = np.zeros(HOURS, np.int32)
    for part in active:
        for hour in range(latest - HOURS + 1, part.last_hour + 1):  # in both rings
            hours[hour % HOURS] += part.hours[hour % HOURS]
    return hours, latest


def _merge_distances(
    parts: Sequence[ModelState], size: int, rng: np.random.Generator
) -> tuple[npt.NDArray[np.float32], int]:
    """Each member's kept distances are a uniform sample of all it measured: take from each in
    proportion to its count, so the result is a sample of the group's distances."""
    total = sum(part.distance_count for part in parts)
    chosen: list[npt.NDArray[np.float32]] = []
    for part in parts:
        window = part.window()
        if total == 0 or len(window) == 0:
            continue
        take = min(len(window), round(size * part.distance_count / total))
        chosen.append(window[rng.choice(len(window), size=take, replace=False)])
    kept = np.concatenate(chosen) if chosen else np.zeros(0, np.float32)
    distances = np.zeros(size, np.float32)
    distances[: len(kept)] = kept[:size]
    return distances, max(total, len(kept)) if len(kept) >= size else len(kept)
