"""The private tier's activation-space monitor: is a caller's stream of activations natural?

Whoever owns the public host holds its client certificate and the plaintext front, and can send
the private tier any activations it likes. Before its batch is computed, every ``Infer``
request's rows are scored (the runner's batch worker calls ``check_many`` once per batch, one
scoring pass over all its rows) against the model's reference profile (``private_core.activation_profile``) and folded
into two streams: the caller's certificate identity and the API key id it asserts (recorded as
asserted: a compromised public tier may name any). A stream that looks crafted (noise, rows off
the manifold, perturbation sweeps, crafted rows mixed into natural ones) is alerted, then
throttled or refused, per ``ActivationMonitorSettings``.

A request's rows count for its key's stream; they count for the identity's stream only while
that key is below alert, so that one customer sending odd inputs through an honest public tier
is refused alone, while crafted rows spread over many asserted key ids add up for the identity.
Natural activations of natural inputs look natural by construction: only budgets bound those.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from prometheus_client import CollectorRegistry
from threadpoolctl import threadpool_limits

from private_core.activation_metrics import MonitorMetrics
from private_core.activation_profile import (
    FLOAT_DATATYPES,
    STATISTICS,
    ActivationProfile,
    Floats,
    features_of,
)
from private_core.activation_scoring import RowStatistics
from private_core.activation_streams import (
    LEVEL_NAMES,
    OK,
    REFUSE,
    RowEvidence,
    Stream,
    StreamTable,
    log_ratios,
    probes_of,
)
from private_core.monitor_settings import ActivationMonitorSettings
from protos import inference_pb2
from shared.errors import (
    ACTIVATIONS_REFUSED,
    ActivationsRefused,
    InvalidInput,
    PermissionDenied,
)
from shared.logs import get_logger
from shared.manifest import BATCH_DIM, DimSpec, TensorSpec
from shared.tensor_codec import from_proto

log = get_logger(__name__)
PROJECTION_DIM = 32
# Without a profile, the near-duplicate unit is this share of a row's own norm.
NO_PROFILE_UNIT = 0.3
CPU_SAMPLE = 8
UNITS_KEPT = 256  # rows of a group whose near-duplicate units come from one kept array
TIER_REFUSED = "activation monitor: this tier's stream of activations is refused"


@dataclass(frozen=True)
class Verdict:
    """What to do with one request: refuse it with ``error``, or answer after ``delay_s``."""

    error: PermissionDenied | None = None
    delay_s: float = 0.0


PASS = Verdict()


class RowScorer:
    """Turns one model's activation rows into ``RowEvidence`` (scores in reference units)."""

    def __init__(
        self,
        profile: ActivationProfile | None,
        dim: int,
        rng: np.random.Generator,
        distance_tolerance: float = 1.0,
    ) -> None:
        self.profile, self.dim = profile, dim
        self._median = np.zeros(len(STATISTICS), np.float32)
        # A secret projection per process: a sweep cannot hide in directions it drops.
        self._projection = (
            rng.standard_normal((dim, PROJECTION_DIM)) / PROJECTION_DIM**0.5
        ).astype(np.float32)
        if profile is not None:
            low, median, high = profile.quantiles.T
            zero, pattern = STATISTICS.index("zero"), STATISTICS.index("pattern")
            self._median = median
            self._up = np.maximum(high - median, 1e-6)
            self._up[:zero] *= distance_tolerance
            self._down = np.maximum(median - low, 1e-6)
            self._down[:zero] = self._down[pattern] = np.inf  # far only above the median
            if not profile.zero_active:
                self._up[zero] = self._down[zero] = np.inf
            if not profile.pattern_active:
                self._up[pattern] = np.inf
            self._inverse_spreads = np.stack([1 / self._up, -1 / self._down]).astype(np.float32)
        self._stats = None if profile is None else RowStatistics(profile, self._projection)
        if self._stats is not None:
            self._units = self._stats.unit(UNITS_KEPT)  # sliced per group, not allocated

    def evidence(
        self, features: Floats, weight: float, settings: ActivationMonitorSettings
    ) -> RowEvidence:
        """Scores, outlier flags, projections and near-duplicate units of ``features`` rows."""
        if self._stats is None:
            projected = features @ self._projection
            zeros = np.zeros(len(features), np.float32)
            norms = np.sqrt(np.einsum("ij,ij->i", features, features))
            scales = np.maximum(norms * NO_PROFILE_UNIT, 1e-6).astype(np.float32)
            return RowEvidence(zeros, zeros > 0, projected, scales, weight)
        raw, projected = self._stats.raw(features)
        difference = raw - self._median
        # Above the median in units of the upper spread, below it in units of the lower one.
        scaled = difference[:, None, :] * self._inverse_spreads
        scores = np.maximum.reduce(scaled.reshape(len(raw), -1), axis=1)
        units = self._stats.unit
        scales = self._units[: len(raw)] if len(raw) <= len(self._units) else units(len(raw))
        outliers = scores > settings.outlier_score
        unit = self._stats.nn_scale
        return RowEvidence(scores, outliers, projected, scales, weight, unit, probes_of(projected))


@dataclass
class _Model:
    specs: Sequence[TensorSpec]
    scorer: RowScorer
    identities: StreamTable
    keys: StreamTable
    cpu: Any  # the model's children of ``MonitorMetrics.cpu`` and ``.seconds``
    seconds: Any
    plain: str | None  # the one input whose rows are the feature vectors, as they are


@dataclass(eq=False)
class _Part:
    """One request of a group being checked: its streams and analysed rows."""

    request: inference_pb2.InferRequest
    model: _Model
    identity: str
    key: Stream
    tier: Stream
    rows: int = 0
    features: Floats | None = None


class ActivationMonitor:
    """Scores each request's activations per (identity, model) and (key id, model)."""

    def __init__(
        self,
        settings: ActivationMonitorSettings,
        models: Mapping[str, tuple[Sequence[TensorSpec], ActivationProfile | None]],
        registry: CollectorRegistry,
    ) -> None:
        self.settings = settings
        self._ratios = log_ratios(settings)
        self._rng = np.random.default_rng(int.from_bytes(os.urandom(16), "little"))
        self._models: dict[str, _Model] = {}
        self._metrics = MonitorMetrics(registry)
        self._lock = threading.Lock()  # streams are folded one group at a time
        self._groups = itertools.count()
        for name, (specs, profile) in models.items():
            dim = _feature_dim(specs)
            if dim is None:
                log.info("private_monitor_skipped", model=name, reason="no float activations")
                continue
            if profile is None:
                log.warning("private_monitor_without_profile", model=name, signals=["sweeps"])
            elif profile.dim != dim:
                raise ValueError(
                    f"model {name!r}: the activation profile has dimension "
                    f"{profile.dim}, the back stage takes {dim}"
                )
            self._metrics.profile.labels(name).set(0 if profile is None else 1)
            window = settings.window
            self._models[name] = _Model(
                specs,
                RowScorer(profile, dim, self._rng, settings.distance_tolerance),
                StreamTable(settings.max_streams, PROJECTION_DIM, window),
                StreamTable(settings.max_streams, PROJECTION_DIM, window),
                self._metrics.cpu.labels(name),
                self._metrics.seconds.labels(name),
                _plain_input(specs),
            )

    def check(self, request: inference_pb2.InferRequest, identities: Sequence[str]) -> Verdict:
        """Score one request (``InvalidInput`` if its tensors do not fit the model)."""
        (verdict,) = self.check_many([(request, identities)])
        if isinstance(verdict, Exception):
            raise verdict
        return verdict

    def check_many(
        self,
        calls: Sequence[tuple[inference_pb2.InferRequest, Sequence[str]]],
        decoded: Sequence[Mapping[str, np.ndarray]] | None = None,
    ) -> list[Verdict | Exception]:
        """Verdicts of ``calls`` in order, as if checked one by one, with their rows scored in
        one pass per model; a request whose tensors do not fit gets its own exception.
        ``decoded``: each request's arrays when the caller has them already. Thread-safe (the
        runner calls it from its batch workers)."""
        with self._lock:
            # Thread CPU time is a system call (10 us in a sandbox): read on one group in
            # CPU_SAMPLE, counted CPU_SAMPLE times, an unbiased estimate.
            sampled = next(self._groups) % CPU_SAMPLE == 0
            started, cpu = time.perf_counter(), time.thread_time() if sampled else 0.0
            verdicts = self._check_many(calls, decoded)
            used = CPU_SAMPLE * (time.thread_time() - cpu) if sampled else 0.0
            spent = time.perf_counter() - started
        counted = [self._models[r.model] for r, _ in calls if r.model in self._models]
        for model in counted:  # shared out evenly: one group is one pass
            if sampled:
                model.cpu.inc(used / len(counted))
            model.seconds.observe(spent / len(counted))
        return verdicts

    def _check_many(
        self,
        calls: Sequence[tuple[inference_pb2.InferRequest, Sequence[str]]],
        decoded: Sequence[Mapping[str, np.ndarray]] | None,
    ) -> list[Verdict | Exception]:
        parts: list[_Part | Exception | None] = []
        for index, (request, identities) in enumerate(calls):
            try:
                arrays = None if decoded is None else decoded[index]
                parts.append(self._prepare(request, identities, arrays))
            except Exception as error:  # that request fails alone, not its group
                parts.append(error)
        evidence = self._evidence([part for part in parts if isinstance(part, _Part)])
        verdicts: list[Verdict | Exception] = []
        for part in parts:
            if not isinstance(part, _Part):
                verdicts.append(PASS if part is None else part)
                continue
            if part.key.level < REFUSE and part.tier.level < REFUSE and part.rows:
                self._score(part, evidence[id(part)])
            verdicts.append(self._verdict(part.request.model, part.key, part.tier))
        return verdicts

    def _prepare(
        self,
        request: inference_pb2.InferRequest,
        identities: Sequence[str],
        arrays: Mapping[str, np.ndarray] | None,
    ) -> _Part | None:
        """The request's streams and, unless they are refused, its analysed feature rows."""
        model = self._models.get(request.model)
        if model is None:
            return None
        identity = ",".join(sorted(identities))
        key = model.keys.get((identity, request.key_id))
        tier = model.identities.get(identity)
        part = _Part(request, model, identity, key, tier)
        if key.level == REFUSE or tier.level == REFUSE:
            return part
        if arrays is None:
            arrays = {tensor.name: from_proto(tensor) for tensor in request.inputs}
        part.rows = _rows(model.specs, arrays)  # the runner validated them before asking
        if part.rows == 0:
            return part
        analysed = min(part.rows, self.settings.rows_per_call)
        if analysed < part.rows:  # rows drawn with a secret seed: none hidden at known places
            picked = np.sort(self._rng.choice(part.rows, analysed, replace=False))
            arrays = {name: array[picked] for name, array in arrays.items()}
        if model.plain is not None:  # converted to float32 with the group's other rows
            raw = np.asarray(arrays[model.plain])
            part.features = raw.reshape(len(raw), -1)
        else:
            part.features = features_of(arrays, model.specs)
        if part.features.shape[1] != model.scorer.dim:  # before it joins the group's pass
            raise InvalidInput(f"activations of {part.features.shape[1]} features per row")
        return part

    def _evidence(self, parts: Sequence[_Part]) -> dict[int, RowEvidence]:
        """Each part's evidence, from one scoring pass per model over all their rows."""
        found: dict[int, RowEvidence] = {}
        by_model: dict[str, list[_Part]] = {}
        for part in parts:
            if part.features is not None:
                by_model.setdefault(part.request.model, []).append(part)
        for group in by_model.values():
            stacked = [part.features for part in group if part.features is not None]
            rows = as_float32(stacked[0] if len(stacked) == 1 else np.concatenate(stacked))
            whole = group[0].model.scorer.evidence(rows, 1.0, self.settings)
            start = 0
            for part, features in zip(group, stacked, strict=True):
                stop = start + len(features)
                found[id(part)] = whole.part(start, stop, part.rows / len(features))
                start = stop
        return found

    def _score(self, part: _Part, evidence: RowEvidence) -> None:
        model, key, tier = part.request.model, part.key, part.tier
        before = key.level
        self._fold(key, evidence)
        self._note(model, "key", part.request.key_id, before, key)
        if key.level == OK:
            before = tier.level
            self._fold(tier, evidence)
            self._note(model, "identity", part.identity, before, tier)

    def _fold(self, stream: Stream, evidence: RowEvidence) -> None:
        if len(evidence.scores) == 1:  # the common case, on scalars
            stream.fold_one(evidence, self.settings, self._ratios)
            return
        near = stream.near_duplicates(evidence, self.settings)
        stream.update(evidence, near, self.settings)
        stream.remember(evidence.projected)

    def _note(self, model: str, scope: str, name: str, before: int, stream: Stream) -> None:
        """Count a level change, and log it unless the action is ``record``."""
        if stream.level == before:
            return
        level = LEVEL_NAMES[stream.level]
        self._metrics.flagged.labels(model, scope, level).inc()
        if self.settings.action != "record":
            log.warning(
                "private_monitor_alert",
                model=model,
                scope=scope,
                # A key id is what the caller asserted, not proven.
                **({"key_id_asserted": name} if scope == "key" else {"identity": name}),
                # Not "level": that is the log record's own (warning) and would hide this one.
                stream_level=level,
                action=self.settings.action,
                **stream.reason(),
            )

    def _verdict(self, model: str, key: Stream, tier: Stream) -> Verdict:
        if max(key.level, tier.level) < REFUSE or self.settings.action in ("record", "alert"):
            return PASS
        scope = "key" if key.level == REFUSE else "identity"
        if self.settings.action == "throttle":
            self._metrics.throttled.labels(model, scope).inc()
            return Verdict(delay_s=self.settings.throttle_delay_s)
        self._metrics.refused.labels(model, scope).inc()
        if scope == "key":
            return Verdict(ActivationsRefused(ACTIVATIONS_REFUSED))
        return Verdict(PermissionDenied(TIER_REFUSED))

    def level(self, model: str, identity: str, key_id: str | None = None) -> str:
        """The level of a stream (``ok`` when unknown): for tests and operators."""
        entry = self._models[model]
        stream = (
            entry.identities.peek(identity)
            if key_id is None
            else entry.keys.peek((identity, key_id))
        )
        return LEVEL_NAMES[stream.level if stream is not None else OK]


def single_threaded_blas() -> None:
    """Keep NumPy's BLAS on one thread in this process. The monitor's matrix products are small
    and run in the batch workers next to the back stage's threads: a BLAS pool only spins (a
    16-row group cost 8 times the CPU with two BLAS threads on a busy 2-core host)."""
    threadpool_limits(limits=1, user_api="blas")


def _feature_dim(specs: Sequence[TensorSpec]) -> int | None:
    """Length of the feature vector of one sample, or None when there is nothing to score."""
    try:
        zeros = {
            spec.name: np.zeros(
                [1, *(1 if not isinstance(d, int) else d for d in spec.shape[1:])], np.float32
            )
            for spec in specs
        }
        return int(features_of(zeros, specs).shape[1])
    except ValueError:
        return None


def as_float32(rows: np.ndarray) -> Floats:
    """``rows`` in float32. FP16 goes through torch's vectorised conversion when it may (a
    writable array: a group's rows put together), NumPy's is ten times slower."""
    if rows.dtype == np.float32:
        return rows
    if rows.dtype == np.float16 and rows.flags.writeable and rows.flags.c_contiguous:
        out = np.empty(rows.shape, np.float32)
        torch.from_numpy(out).copy_(torch.from_numpy(rows))
        return out
    return rows.astype(np.float32)


def _plain_input(specs: Sequence[TensorSpec]) -> str | None:
    """The input whose rows, flattened, are the feature vectors (``features_of`` without
    pooling or concatenation), if the model has one such and no other activation input."""
    floats = [
        spec
        for spec in specs
        if spec.datatype in FLOAT_DATATYPES and (spec.source or "").startswith("front:")
    ]
    if len(floats) != 1 or any(isinstance(dim, DimSpec) for dim in floats[0].shape[1:]):
        return None
    return floats[0].name


def _rows(specs: Sequence[TensorSpec], arrays: Mapping[str, np.ndarray]) -> int:
    """Samples in a validated request: the size of its batch dimension (0 if it has none)."""
    for spec in specs:
        for axis, dim in enumerate(spec.shape):
            if isinstance(dim, DimSpec) and dim.name == BATCH_DIM and spec.name in arrays:
                return int(np.asarray(arrays[spec.name]).shape[axis])
    return 0


def monitored_models(stages: Mapping[str, Any]) -> dict[str, tuple[Sequence[TensorSpec], Any]]:
    """Back-stage input specs and activation profile of each loaded ``BackStage``."""
    return {
        name: (stage.manifest.inputs, stage.activation_profile) for name, stage in stages.items()
    }
