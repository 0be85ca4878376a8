"""Prometheus metrics of the private tier, served on a separate, metrics-only HTTP port.

``PrivateMetrics`` owns its ``CollectorRegistry`` (not the process-wide default), so several tiers
in one process never clash. Labels are bounded: ``model`` is a model found in the tier's folder or
``"unknown"``, ``code`` a gRPC status code name.

The metrics port is plain HTTP and internal: it serves only this registry's text exposition
(counts, latencies, batch sizes, model names). It never exposes weights, keys or tensors, and it
is separate from the mutual-TLS gRPC port so scraping needs no client certificate.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)

UNKNOWN_MODEL = "unknown"
BATCH_BUCKETS = tuple(float(2**i) for i in range(9))  # 1, 2, 4, ..., 256
# From 1 ms to 10 s: a small back stage runs in ~1 ms, a large batch on CPU in seconds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass
class PrivateMetrics:
    """The private tier's metrics; build it with ``create``."""

    registry: CollectorRegistry
    models: frozenset[str]
    batch_size: Histogram
    back_stage_seconds: Histogram
    queue_wait_seconds: Histogram
    requests: Counter
    batch_calls: Histogram
    model_load_errors: Counter
    models_loaded: Gauge
    _server: tuple[WSGIServer, threading.Thread] | None = field(default=None)

    @classmethod
    def create(cls, models: Iterable[str]) -> PrivateMetrics:
        """Metrics for ``models``: the names found in the tier's folder, loaded or not."""
        registry = CollectorRegistry()
        return cls(
            registry=registry,
            models=frozenset(models),
            batch_size=Histogram(
                "splitvault_private_batch_size",
                "Rows per back-stage batch.",
                ["model"],
                buckets=BATCH_BUCKETS,
                registry=registry,
            ),
            back_stage_seconds=Histogram(
                "splitvault_back_stage_seconds",
                "Back-stage compute time in seconds.",
                ["model"],
                buckets=LATENCY_BUCKETS,
                registry=registry,
            ),
            queue_wait_seconds=Histogram(
                "splitvault_private_queue_wait_seconds",
                "Time a request waited in the batcher's queue for its batch to start, seconds.",
                ["model"],
                buckets=LATENCY_BUCKETS,
                registry=registry,
            ),
            requests=Counter(
                "splitvault_private_requests_total",
                "Inference calls answered, by model and gRPC status code.",
                ["model", "code"],
                registry=registry,
            ),
            batch_calls=Histogram(
                "splitvault_private_batch_call_requests",
                "Requests per InferBatch call (the public tier sends together those ready at "
                "one moment; each is also counted in splitvault_private_requests_total).",
                buckets=BATCH_BUCKETS[:7],
                registry=registry,
            ),
            model_load_errors=Counter(
                "splitvault_model_load_errors_total",
                "Models that failed to load.",
                ["model"],
                registry=registry,
            ),
            models_loaded=Gauge(
                "splitvault_models_loaded", "Models loaded and serving.", registry=registry
            ),
        )

    def model_label(self, model: str) -> str:
        """``model`` when the tier knows it, else ``"unknown"``."""
        return model if model in self.models else UNKNOWN_MODEL

    def observe_batch(self, model: str, size: int) -> None:
        """Record the number of rows in one back-stage batch."""
        self.batch_size.labels(self.model_label(model)).observe(size)

    def observe_back_stage(self, model: str, seconds: float) -> None:
        """Record the back stage's compute time."""
        self.back_stage_seconds.labels(self.model_label(model)).observe(seconds)

    def observe_queue_wait(self, model: str, seconds: float) -> None:
        """Record how long one request waited for its batch to start."""
        self.queue_wait_seconds.labels(self.model_label(model)).observe(seconds)

    def observe_request(self, model: str, code: grpc.StatusCode) -> None:
        """Count one answered call with its gRPC status code (``OK``, ``NOT_FOUND``, ...)."""
        self.requests.labels(self.model_label(model), code.name).inc()

    def observe_batch_call(self, requests: int) -> None:
        """Record the number of requests in one ``InferBatch`` call."""
        self.batch_calls.observe(requests)

    def model_load_error(self, model: str) -> None:
        """Count a model that failed to load."""
        self.model_load_errors.labels(self.model_label(model)).inc()

    def set_models_loaded(self, n: int) -> None:
        """Export the number of models loaded."""
        self.models_loaded.set(n)

    def render(self) -> tuple[bytes, str]:
        """The exposition body and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def serve(self, host: str, port: int) -> int:
        """Serve ``/metrics`` over plain HTTP in a daemon thread; the bound port (``port`` may be 0)."""
        if self._server is not None:
            raise RuntimeError("the metrics server is already running")
        server, thread = start_http_server(port, addr=host, registry=self.registry)
        self._server = (server, thread)
        return int(server.server_port)

    def stop(self) -> None:
        """Stop the metrics server, if running, and close its socket."""
        if self._server is None:
            return
        server, thread = self._server
        self._server = None
        server.shutdown()
        server.server_close()
        thread.join()


def start_metrics_server(metrics: PrivateMetrics, host: str, port: int) -> int:
    """Serve ``metrics`` on ``host:port`` (internal, metrics only); the bound port.

    ``metrics.stop()`` shuts the server down.
    """
    return metrics.serve(host, port)
