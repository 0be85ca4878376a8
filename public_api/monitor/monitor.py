"""``ExtractionMonitor``: per-key risk of model extraction, from the queries a key sends.

Each answered request goes through ``observe``: the key's state is read from the store, updated
with the request's inputs, front activations and predicted classes (in a worker thread: about a
millisecond for a batch of 64), scored and written back by compare-and-set: if another replica
wrote the state meanwhile, the update is computed again from the fresh state, so no update is
lost and a level never drops except by an operator's clear. Requests of one key that arrive
while its state is being updated are folded into the next update together: one read, one
thread hop and one write for all of them, so a busy key costs little more than a quiet one.
``current`` reads the verdict already reached without computing anything, on every request.
State that cannot be read refuses the request (503, ``monitor_state_unreadable``), never reads
as "ok". Throttle and block decisions are also kept in a ``DecisionStore`` (the key store), so
they outlive the state. See ``signals`` for the signals and ``MonitorConfig`` for the weights,
thresholds and actions.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import random
import secrets
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import numpy.typing as npt

from public_api.monitor import signals
from public_api.monitor.config import MonitorConfig
from public_api.monitor.decisions import DecisionStore
from public_api.monitor.profile import ReferenceProfile, features_of
from public_api.monitor.signals import Signal
from public_api.monitor.state import KeyState, ModelState, load_state, read_meta
from public_api.monitor.store import (
    LEVELS,
    Assessment,
    Level,
    MonitorStore,
    SqliteAssessmentLog,
    UnreadableState,
    Versioned,
    higher,
    level_of,
)
from shared.errors import SplitVaultError, Unavailable
from shared.logs import get_logger
from shared.manifest import TensorSpec

__all__ = ["Assessment", "ExtractionMonitor", "MonitorConfig"]

log = get_logger(__name__)
LOCK_STRIPES = 64
_OVER_BLOCK: dict[str, Level] = {"block": "blocked", "throttle": "throttled"}
_LASTING: tuple[Level, ...] = ("throttled", "blocked")  # kept in the DecisionStore too
_JITTER = random.SystemRandom()


class ExtractionMonitor:
    """Scores each API key's queries and keeps its verdict in ``store``.

    ``profiles`` maps model names to the reference profile saved at pack time (models without
    one get PRADA, label and volume signals only). ``log`` receives each key's latest
    assessment for ``splitvault monitor show`` and carries the operator's clear requests.
    ``decisions`` keeps throttle and block decisions beyond ``store`` (None: in ``store`` only).
    ``clock`` gives the time (the benchmark simulates days of traffic with it).
    """

    def __init__(
        self,
        config: MonitorConfig,
        profiles: Mapping[str, ReferenceProfile],
        store: MonitorStore,
        log: SqliteAssessmentLog | None = None,
        *,
        decisions: DecisionStore | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self._profiles = dict(profiles)
        self._store = store
        self._log = log
        self._decisions = decisions
        self._clock = clock
        self._locks = [asyncio.Lock() for _ in range(LOCK_STRIPES)]
        self._waiting: dict[str, list[tuple[_Request, asyncio.Future[Assessment]]]] = {}
        self._next_clear_poll = -math.inf

    async def current(self, key_id: str) -> Assessment:
        """The verdict already reached for ``key_id``: the graver of its state's level and its
        lasting decision (blocked stays blocked until cleared); ``Unavailable`` if unreadable."""
        await self._apply_clear_requests()
        found, decided = await self._state_and_decision(key_id)
        assessment = Assessment(key_id, 0.0, "ok", (), 0, 0.0)
        if found is not None:
            try:
                assessment = _from_meta(key_id, read_meta(found.data))
            except (ValueError, KeyError, TypeError) as error:
                raise _unreadable(key_id, error) from error
        level = higher(assessment.level, decided)
        if level in _LASTING and level != decided and self._decisions is not None:
            await self._decisions.decide(key_id, level)  # a state from before decisions were kept
        return assessment if level == assessment.level else replace(assessment, level=level)

    async def observe(
        self,
        key_id: str,
        model: str,
        request_inputs: Mapping[str, np.ndarray],
        activations: Mapping[str, np.ndarray],
        predicted: np.ndarray | None,
        specs: Sequence[TensorSpec],
    ) -> Assessment:
        """Account for one answered request (a batch counts as that many queries)."""
        await self._apply_clear_requests()
        request = _Request(model, request_inputs, activations, predicted, specs, self._clock())
        loop = asyncio.get_running_loop()
        done: asyncio.Future[Assessment] = loop.create_future()
        entry = (request, done)
        self._waiting.setdefault(key_id, []).append(entry)
        try:
            async with self._locks[zlib.crc32(key_id.encode()) % LOCK_STRIPES]:
                if not done.done():  # not folded into an update that ran while this one waited
                    await self._update_with_waiting(key_id, done)
        except asyncio.CancelledError:  # the caller went away: its request is not counted
            waiting = self._waiting.get(key_id, [])
            if entry in waiting:
                waiting.remove(entry)
            raise
        return done.result()

    async def _update_with_waiting(self, key_id: str, own: asyncio.Future[Assessment]) -> None:
        """One update of ``key_id``'s state with every request waiting for it (lock held)."""
        batch = self._waiting.pop(key_id, [])
        try:
            update = await self._commit(key_id, [request for request, _ in batch])
        except BaseException:
            # The caller that ran the update gets the error; the others try again themselves.
            others = [entry for entry in batch if entry[1] is not own]
            self._waiting[key_id] = others + self._waiting.get(key_id, [])
            raise
        for _, future in batch:
            if not future.done():
                future.set_result(update.assessment)
        self._announce(update.previous, update.assessment, batch[-1][0].model)
        if self._log is not None and update.log_due:
            await self._log.record(update.assessment)

    async def _commit(self, key_id: str, requests: Sequence[_Request]) -> _Update:
        """Read, update, compare-and-set; again from the fresh state while another replica
        wins the race, at most ``cas_attempts`` times (then ``Unavailable``). A throttle or block
        is made lasting before the state carrying it is committed."""
        for attempt in range(1, self.config.cas_attempts + 1):
            found, decided = await self._state_and_decision(key_id)
            data = None if found is None else found.data
            try:
                update = await asyncio.to_thread(self._update, key_id, data, requests, decided)
            except UnreadableState as error:
                raise _unreadable(key_id, error) from error
            level = update.assessment.level
            if self._decisions is not None and level in _LASTING and level != decided:
                await self._decisions.decide(key_id, level)
            if await self._store.swap(
                key_id, None if found is None else found.version, update.data
            ):
                return update
            log.info("monitor_update_conflict", key_id=key_id, attempt=attempt)
            await asyncio.sleep(
                _JITTER.uniform(0, self.config.cas_backoff_s * 2 ** min(attempt, 6))
            )
        log.error("monitor_update_contended", key_id=key_id, attempts=self.config.cas_attempts)
        raise Unavailable(
            "the monitor could not record this request in time; retry", retry_after_s=1
        )

    async def _read(self, key_id: str) -> Versioned | None:
        try:
            return await self._store.read(key_id)
        except UnreadableState as error:
            raise _unreadable(key_id, error) from error

    async def _decided(self, key_id: str) -> Level | None:
        return None if self._decisions is None else await self._decisions.decided(key_id)

    async def _state_and_decision(self, key_id: str) -> tuple[Versioned | None, Level | None]:
        """The key's state and lasting decision: both at once when the decision is a network
        read too, else one after the other (no tasks to make for reads that never wait)."""
        if self._decisions is not None and not self._decisions.immediate:
            return await asyncio.gather(self._read(key_id), self._decided(key_id))
        return await self._read(key_id), await self._decided(key_id)

    async def clear(self, key_id: str) -> None:
        """Forget everything about ``key_id``: its statistics and any block or throttle (the
        state first: a clear that fails halfway leaves the lasting decision, not a stale one)."""
        now = self._clock()
        async with self._locks[zlib.crc32(key_id.encode()) % LOCK_STRIPES]:
            await self._store.reset(key_id, KeyState(updated_at=now, logged_at=now).to_bytes())
            if self._decisions is not None:
                await self._decisions.lift(key_id)
        log.info("extraction_cleared", key_id=key_id)
        if self._log is not None:
            await self._log.record(Assessment(key_id, 0.0, "ok", (), 0, now))

    async def _apply_clear_requests(self) -> None:
        if self._log is None or time.monotonic() < self._next_clear_poll:
            return
        self._next_clear_poll = time.monotonic() + self.config.clear_poll_s
        for key_id in await self._log.take_clear_requests():
            try:
                await self.clear(key_id)
            except SplitVaultError as error:  # asked again, for the next poll
                log.error("monitor_clear_failed", key_id=key_id, reason=error.message)
                await asyncio.to_thread(self._log.request_clear, key_id)

    def _update(
        self, key_id: str, data: bytes | None, requests: Sequence[_Request], decided: Level | None
    ) -> _Update:
        state = load_state(data)
        previous = higher(level_of(state.level), decided)
        latest: dict[str, _Request] = {}
        for request in requests:
            self._record(key_id, state.models.setdefault(request.model, ModelState()), request)
            latest[request.model] = request
        for model, request in latest.items():
            model_state = state.models[model]
            found = self._signals(model_state, request)
            model_state.score = min(1.0, sum(self._weight(s) * s.value for s in found))
            ranked = sorted(found, key=lambda s: self._weight(s) * s.value, reverse=True)
            model_state.reasons = [s.reason for s in ranked if s.value > 0]
        request = requests[-1]
        top = max(state.models.values(), key=lambda m: m.score)
        state.score, state.reasons = top.score, list(top.reasons)
        state.level = self._level_for(state, previous)
        state.updated_at = request.now
        log_due = (
            state.level != state.logged_level
            or request.now - state.logged_at >= self.config.log_interval_s
        )
        if log_due:
            state.logged_at, state.logged_level = request.now, state.level
        assessment = Assessment(
            key_id,
            state.score,
            level_of(state.level),
            tuple(state.reasons),
            state.queries,
            state.updated_at,
        )
        return _Update(state.to_bytes(), assessment, previous, log_due)

    def _record(self, key_id: str, state: ModelState, request: _Request) -> None:
        config, profile = self.config, self._profiles.get(request.model)
        count = request.batch
        signals.record_hours(state, request.now, count)
        fresh = signals.record_repeats(state, _hashes(request.inputs, count), config.repeat_window)
        state.queries += count
        labels = request.labels()
        if labels is not None:
            signals.record_labels(state, labels, config.label_buckets)
        picked = pick_rows(np.flatnonzero(fresh), config.samples_per_call)
        if len(picked) == 0:
            return
        features = None
        if profile is not None:
            sliced = {
                name: np.asarray(value)[picked] for name, value in request.activations.items()
            }
            features = features_of(sliced, request.specs)
            if features.shape[1] == profile.dim:
                signals.record_ood(state, profile.ood_distances(features), profile.ood_threshold)
                signals.record_cells(state, profile.cell_of(features), profile.cells)
            else:
                features = None
        vectors, space = self._prada_vectors(request, picked, features, profile)
        if vectors is None or (state.space and state.space != space):
            return
        state.space = space
        buckets = np.zeros(len(picked), np.int64) if labels is None else labels[picked]
        rng = np.random.default_rng([state.queries, zlib.crc32(key_id.encode())])
        signals.record_prada(state, vectors, np.mod(buckets, config.class_buckets), config, rng)

    def _prada_vectors(
        self,
        request: _Request,
        picked: npt.NDArray[np.int64],
        features: npt.NDArray[np.float32] | None,
        profile: ReferenceProfile | None,
    ) -> tuple[npt.NDArray[np.float32] | None, str]:
        """The request itself when small and floating, else the features' PCA coordinates."""
        flat = _flat_inputs(request.inputs, request.batch)
        if flat is not None and flat.shape[1] <= self.config.max_input_dim:
            return flat[picked], "input"
        if features is not None and profile is not None:
            return ((features - profile.mean) @ profile.components.T).astype(np.float32), "pca"
        return None, ""

    def _signals(self, state: ModelState, request: _Request) -> list[Signal]:
        config, profile = self.config, self._profiles.get(request.model)
        found = [
            signals.prada_signal(state, config),
            signals.label_signal(state, config),
            signals.volume_signal(state, request.now, config),
        ]
        if profile is not None:
            found += [
                signals.ood_signal(state, profile, config),
                signals.cell_signal(state, profile, config),
            ]
        return [signal for signal in found if signal is not None]

    def _weight(self, signal: Signal) -> float:
        return float(getattr(self.config, f"w_{signal.name}"))

    def _level_for(self, state: KeyState, previous: Level) -> str:
        config = self.config
        level: Level = "ok"
        if state.queries >= config.min_queries and state.score >= config.block_threshold:
            level = _OVER_BLOCK.get(config.action, "flagged")
        elif state.queries >= config.min_queries and state.score >= config.flag_threshold:
            level = "flagged"
        if previous in ("throttled", "blocked") and LEVELS.index(previous) > LEVELS.index(level):
            return previous
        return level

    def _announce(self, previous: Level, assessment: Assessment, model: str) -> None:
        """Log the events of a level change the configured action asks for."""
        if self.config.action == "record" or previous == assessment.level:
            return
        rank = LEVELS.index
        fields: dict[str, Any] = {
            "key_id": assessment.key_id,
            "model": model,
            "score": round(assessment.score, 3),
            "queries": assessment.queries,
            "reasons": list(assessment.reasons),
        }
        if rank(previous) < rank("flagged") <= rank(assessment.level):
            log.warning("extraction_alert", level=assessment.level, **fields)
        if assessment.level in ("throttled", "blocked"):
            log.warning(f"extraction_{assessment.level}", **fields)

    # Key groups (public_api/monitor/groups.py) read states and raise levels through these.

    async def state_bytes(self, key_id: str) -> bytes | None:
        """``key_id``'s serialized state as stored (None if it has none)."""
        return await self._store.get(key_id)

    def judge(self, state: KeyState, now: float) -> tuple[float, list[str], Level]:
        """Score ``state`` (e.g. a key group's merged state) as ``observe`` scores a key's."""
        best: tuple[float, list[str]] = (0.0, [])
        for model, model_state in state.models.items():
            found = self._signals(model_state, _Request(model, {}, {}, None, (), now))
            score = min(1.0, sum(self._weight(s) * s.value for s in found))
            ranked = sorted(found, key=lambda s: self._weight(s) * s.value, reverse=True)
            if score >= best[0]:
                best = (score, [s.reason for s in ranked if s.value > 0])
        state.score, state.reasons = best
        return best[0], best[1], level_of(self._level_for(state, "ok"))

    async def escalate(
        self,
        key_id: str,
        level: Level,
        score: float,
        reasons: Sequence[str],
        *,
        force: bool = False,
    ) -> Assessment | None:
        """Set ``key_id`` to ``level`` for a reason outside its own statistics (its group's
        score, an operator's order), as ``observe`` would: the gate refuses a blocked key and
        throttles a throttled one. Never lowers a level unless ``force``; None if unchanged."""
        now = self._clock()
        async with self._locks[zlib.crc32(key_id.encode()) % LOCK_STRIPES]:
            for attempt in range(1, self.config.cas_attempts + 1):
                found, decided = await asyncio.gather(self._read(key_id), self._decided(key_id))
                try:
                    state = load_state(None if found is None else found.data)
                except UnreadableState as error:
                    raise _unreadable(key_id, error) from error
                previous = higher(level_of(state.level), decided)
                rank = LEVELS.index
                if previous == level or (rank(previous) > rank(level) and not force):
                    return None
                state.level, state.score = level, max(state.score, score)
                state.reasons = [*reasons, *state.reasons][:8]
                state.updated_at = state.logged_at = now
                state.logged_level = level
                if self._decisions is not None:
                    if decided is not None and rank(decided) > rank(level):
                        await self._decisions.lift(key_id)  # an operator's milder order
                    if level in _LASTING:
                        await self._decisions.decide(key_id, level)
                version = None if found is None else found.version
                if await self._store.swap(key_id, version, state.to_bytes()):
                    break
                await asyncio.sleep(
                    _JITTER.uniform(0, self.config.cas_backoff_s * 2 ** min(attempt, 6))
                )
            else:
                raise Unavailable(
                    "the monitor could not record this decision in time; retry", retry_after_s=1
                )
        assessment = Assessment(
            key_id, state.score, level, tuple(state.reasons), state.queries, now
        )
        if self._log is not None:
            await self._log.record(assessment)
        return assessment


@dataclass(frozen=True)
class _Request:
    """One observed request, as the worker thread needs it."""

    model: str
    inputs: Mapping[str, np.ndarray]
    activations: Mapping[str, np.ndarray]
    predicted: np.ndarray | None
    specs: Sequence[TensorSpec]
    now: float

    @property
    def batch(self) -> int:
        """Samples in the request (the leading dimension of its inputs)."""
        first = next(iter(self.inputs.values()), None)
        return int(first.shape[0]) if first is not None and first.ndim else 1

    def labels(self) -> npt.NDArray[np.int64] | None:
        """Top-1 class per sample (the first column of a top-k answer)."""
        if self.predicted is None:
            return None
        return np.asarray(self.predicted).reshape(self.batch, -1)[:, 0].astype(np.int64)


@dataclass(frozen=True)
class _Update:
    """What a state update produced."""

    data: bytes
    assessment: Assessment
    previous: Level
    log_due: bool


def _unreadable(key_id: str, error: Exception) -> Unavailable:
    """Log state that cannot be read and refuse: an unknown verdict is not "ok"."""
    log.error("monitor_state_unreadable", key_id=key_id, error=str(error)[:200])
    return Unavailable(
        "the extraction monitor's state of this API key cannot be read; contact the operator",
        retry_after_s=5,
    )


def _from_meta(key_id: str, meta: Mapping[str, Any]) -> Assessment:
    return Assessment(
        key_id,
        float(meta["score"]),
        level_of(str(meta["level"])),
        tuple(meta["reasons"]),
        int(meta["queries"]),
        float(meta["updated_at"]),
    )


def pick_rows(
    indices: npt.NDArray[np.int64], limit: int, rng: np.random.Generator | None = None
) -> npt.NDArray[np.int64]:
    """At most ``limit`` of ``indices``: all of them, or a uniform random subset (sorted).

    ``rng`` defaults to a generator seeded with 128 secret bits per call, so a client cannot
    know which rows of its request are analysed and hide rows at the others.
    """
    if len(indices) <= limit:
        return indices
    rng = rng if rng is not None else np.random.default_rng(secrets.randbits(128))
    return np.sort(rng.choice(indices, size=limit, replace=False))


def _hashes(inputs: Mapping[str, np.ndarray], batch: int) -> npt.NDArray[np.uint64]:
    """A 64-bit digest of each sample (all its inputs), for spotting exact repeats."""
    arrays = [np.ascontiguousarray(inputs[name]) for name in sorted(inputs)]
    digests = np.empty(batch, np.uint64)
    for i in range(batch):
        h = hashlib.blake2b(digest_size=8)
        for array in arrays:
            h.update(array[i].tobytes())
        digests[i] = int.from_bytes(h.digest(), "little")
    return digests


def _flat_inputs(inputs: Mapping[str, np.ndarray], batch: int) -> npt.NDArray[np.float32] | None:
    """The request as one float32 row per sample, if every input is floating."""
    arrays = [np.asarray(inputs[name]) for name in sorted(inputs)]
    if not arrays or any(array.dtype.kind != "f" for array in arrays):
        return None
    return np.concatenate([a.reshape(batch, -1).astype(np.float32) for a in arrays], axis=1)
