"""Prometheus metrics of the public tier, in a registry of their own, served on an internal port.

The public listener has no ``/metrics``: per-key risk scores and limit counters would tell a
client how close it is to being blocked, and who the other customers are. ``serve`` exposes
the registry on a separate plain-HTTP listener (``metrics_host:metrics_port``) instead, for the
monitoring network only, as the private tier does.

Each ``PublicMetrics`` owns a ``CollectorRegistry`` instead of using the process-wide default one,
so several apps in one process (tests, benchmarks) never clash on metric names. Every label set is
bounded: ``model`` is a deployed model's name or ``"unknown"``, ``status`` an HTTP code, ``scope``
one of three words, ``key_id`` at most ``max_risk_keys`` keys (see ``set_risk``), and
``setting`` one of the few settings ``public_api.unsafe`` knows.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass, field

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from shared.metrics_http import MetricsListener, serve_metrics

UNKNOWN_MODEL = "unknown"
RATE_LIMIT_SCOPES = frozenset({"key", "ip", "quota"})
DEFAULT_MAX_RISK_KEYS = 50
# From 1 ms to 10 s: a small model's front stage takes ~1 ms, a cold private call seconds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass
class PublicMetrics:
    """The public tier's counters, histograms and gauges; build it with ``create``."""

    registry: CollectorRegistry
    models: frozenset[str]
    max_risk_keys: int
    requests: Counter
    front_seconds: Histogram
    private_call_seconds: Histogram
    request_seconds: Histogram
    rate_limited_total: Counter
    blocked_total: Counter
    unauthenticated_total: Counter
    key_risk_score: Gauge
    audit_pending: Gauge
    audit_commit_seconds: Histogram
    private_ready: Gauge
    unsafe_setting: Gauge
    grpc_calls_in_flight: Gauge
    _risk: dict[str, float] = field(default_factory=dict)
    _risk_lock: threading.Lock = field(default_factory=threading.Lock)
    _listener: MetricsListener | None = None

    @classmethod
    def create(
        cls, models: Iterable[str], max_risk_keys: int = DEFAULT_MAX_RISK_KEYS
    ) -> PublicMetrics:
        """Metrics for the deployed ``models``, keeping at most ``max_risk_keys`` risk labels."""
        if max_risk_keys < 1:
            raise ValueError("max_risk_keys must be at least 1")
        registry = CollectorRegistry()
        new = _Factory(registry)
        metrics = cls(
            registry=registry,
            models=frozenset(models),
            max_risk_keys=max_risk_keys,
            requests=new.counter(
                "splitvault_requests_total",
                "Inference requests answered, by model and HTTP status.",
                "model",
                "status",
            ),
            front_seconds=new.latency("splitvault_front_seconds", "Front-stage compute."),
            private_call_seconds=new.latency(
                "splitvault_private_call_seconds", "Round trip to the private tier."
            ),
            request_seconds=new.latency("splitvault_request_seconds", "Whole request."),
            rate_limited_total=new.counter(
                "splitvault_rate_limited_total",
                "Requests refused with 429, by model and scope (key, ip or quota).",
                "model",
                "scope",
            ),
            blocked_total=new.counter(
                "splitvault_blocked_total", "Requests refused: key blocked by the monitor.", "model"
            ),
            unauthenticated_total=new.counter(
                "splitvault_unauthenticated_total", "Requests refused with 401."
            ),
            key_risk_score=new.gauge(
                "splitvault_key_risk_score", "Risk score of the highest-scoring keys.", "key_id"
            ),
            audit_pending=new.gauge("splitvault_audit_pending", "Audit records not yet written."),
            audit_commit_seconds=Histogram(
                "splitvault_audit_commit_seconds",
                "Wait of a served answer for its audit record's commit. Seconds.",
                buckets=LATENCY_BUCKETS,
                registry=registry,
            ),
            private_ready=new.gauge("splitvault_private_ready", "1 when the private tier answers."),
            unsafe_setting=new.gauge(
                "splitvault_unsafe_setting",
                "1 for each setting that switches a protection off.",
                "setting",
                "value",
            ),
            grpc_calls_in_flight=new.gauge(
                "splitvault_grpc_calls_in_flight", "Calls under way on the v2 gRPC ingress."
            ),
        )
        metrics._init_series()
        return metrics

    def _init_series(self) -> None:
        """Export zero-valued series for every deployed model so rates start from 0."""
        for model in self.models:
            self.front_seconds.labels(model)
            self.private_call_seconds.labels(model)
            self.request_seconds.labels(model)
            self.blocked_total.labels(model)

    def model_label(self, model: str) -> str:
        """``model`` when it is deployed, else ``"unknown"`` (callers choose any name)."""
        return model if model in self.models else UNKNOWN_MODEL

    def observe_request(self, model: str, status: int, seconds: float) -> None:
        """Count one answered request and record its total time."""
        label = self.model_label(model)
        self.requests.labels(label, str(int(status))).inc()
        self.request_seconds.labels(label).observe(seconds)

    def observe_front(self, model: str, seconds: float) -> None:
        """Record the front stage's compute time."""
        self.front_seconds.labels(self.model_label(model)).observe(seconds)

    def observe_private_call(self, model: str, seconds: float) -> None:
        """Record the round trip to the private tier."""
        self.private_call_seconds.labels(self.model_label(model)).observe(seconds)

    def rate_limited(self, model: str, scope: str) -> None:
        """Count a 429; ``scope`` is ``"key"``, ``"ip"`` or ``"quota"``."""
        if scope not in RATE_LIMIT_SCOPES:
            raise ValueError(f"scope must be one of {sorted(RATE_LIMIT_SCOPES)}, not {scope!r}")
        self.rate_limited_total.labels(self.model_label(model), scope).inc()

    def blocked(self, model: str) -> None:
        """Count a request refused because its key is blocked."""
        self.blocked_total.labels(self.model_label(model)).inc()

    def unauthenticated(self) -> None:
        """Count a 401."""
        self.unauthenticated_total.inc()

    def set_risk(self, key_id: str, score: float) -> None:
        """Export ``key_id``'s risk score, keeping only the ``max_risk_keys`` highest scores.

        Each label value is a separate time series kept forever by Prometheus, so one series per
        key would grow without bound with the number of keys (and an attacker can create keys).
        The gauge therefore holds the top scores only; a key pushed out has its series removed.
        """
        with self._risk_lock:
            self._risk[key_id] = score
            self.key_risk_score.labels(key_id).set(score)
            while len(self._risk) > self.max_risk_keys:
                lowest = min(self._risk, key=self._risk.__getitem__)
                del self._risk[lowest]
                self.key_risk_score.remove(lowest)

    def set_audit_pending(self, n: int) -> None:
        """Export the number of audit records not yet written."""
        self.audit_pending.set(n)

    def observe_audit_commit(self, seconds: float) -> None:
        """Record how long a served answer waited for its audit record's commit."""
        self.audit_commit_seconds.observe(seconds)

    def set_private_ready(self, ready: bool) -> None:
        """Export whether the private tier is reachable (1) or not (0)."""
        self.private_ready.set(1 if ready else 0)

    def set_unsafe_settings(self, settings: Iterable[tuple[str, str]]) -> None:
        """Export each (setting, value) that switches a protection off."""
        for name, value in settings:
            self.unsafe_setting.labels(name, value).set(1)

    def render(self) -> tuple[bytes, str]:
        """The exposition body and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def serve(self, host: str, port: int, *, reuse_port: bool = False) -> int:
        """Serve the registry over plain HTTP on ``host:port`` (internal only); the bound port."""
        if self._listener is not None:
            raise RuntimeError("the metrics listener is already running")
        self._listener = serve_metrics(self.registry, host, port, reuse_port=reuse_port)
        return self._listener.port

    def stop(self) -> None:
        """Stop the metrics listener, if running."""
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.stop()


@dataclass(frozen=True)
class _Factory:
    """Builds metrics registered in one registry."""

    registry: CollectorRegistry

    def counter(self, name: str, documentation: str, *labels: str) -> Counter:
        return Counter(name, documentation, labels, registry=self.registry)

    def gauge(self, name: str, documentation: str, *labels: str) -> Gauge:
        return Gauge(name, documentation, labels, registry=self.registry)

    def latency(self, name: str, documentation: str) -> Histogram:
        """A per-model latency histogram in seconds with ``LATENCY_BUCKETS``."""
        return Histogram(
            name,
            f"{documentation} Seconds.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
