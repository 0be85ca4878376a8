"""Tests of the private tier's metrics and of their separate HTTP port."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import httpx
import pytest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from private_core.metrics import PrivateMetrics, start_metrics_server

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(body: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
    }


def scrape(metrics: PrivateMetrics) -> Samples:
    body, content_type = metrics.render()
    assert content_type == CONTENT_TYPE_LATEST
    return parse(body.decode())


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


@pytest.fixture
def metrics() -> Iterator[PrivateMetrics]:
    metrics = PrivateMetrics.create(["digits", "broken"])
    yield metrics
    metrics.stop()


def test_batch_size_histogram_has_power_of_two_buckets_up_to_256(metrics: PrivateMetrics) -> None:
    for size in (1, 3, 3, 64, 300):
        metrics.observe_batch("digits", size)
    samples = scrape(metrics)
    bounds = sorted(
        float(dict(labels)["le"])
        for name, labels in samples
        if name == "splitvault_private_batch_size_bucket"
    )
    assert bounds == [1, 2, 4, 8, 16, 32, 64, 128, 256, float("inf")]
    bucket = "splitvault_private_batch_size_bucket"
    assert value(samples, bucket, model="digits", le="1.0") == 1
    assert value(samples, bucket, model="digits", le="2.0") == 1
    assert value(samples, bucket, model="digits", le="4.0") == 3
    assert value(samples, bucket, model="digits", le="64.0") == 4
    assert value(samples, bucket, model="digits", le="256.0") == 4
    assert value(samples, bucket, model="digits", le="+Inf") == 5
    assert value(samples, "splitvault_private_batch_size_sum", model="digits") == 371


def test_back_stage_latency_histogram(metrics: PrivateMetrics) -> None:
    metrics.observe_back_stage("digits", 0.0007)
    metrics.observe_back_stage("digits", 0.3)
    samples = scrape(metrics)
    bucket = "splitvault_back_stage_seconds_bucket"
    assert value(samples, bucket, model="digits", le="0.001") == 1
    assert value(samples, bucket, model="digits", le="0.25") == 1
    assert value(samples, bucket, model="digits", le="0.5") == 2
    assert value(samples, "splitvault_back_stage_seconds_count", model="digits") == 2
    assert value(samples, "splitvault_back_stage_seconds_sum", model="digits") == pytest.approx(
        0.3007
    )


def test_requests_are_counted_by_grpc_code_name_and_bounded_model(
    metrics: PrivateMetrics,
) -> None:
    metrics.observe_request("digits", grpc.StatusCode.OK)
    metrics.observe_request("digits", grpc.StatusCode.OK)
    metrics.observe_request("broken", grpc.StatusCode.UNAVAILABLE)
    metrics.observe_request("nonexistent", grpc.StatusCode.NOT_FOUND)
    samples = scrape(metrics)
    total = "splitvault_private_requests_total"
    assert value(samples, total, model="digits", code="OK") == 2
    assert value(samples, total, model="broken", code="UNAVAILABLE") == 1
    assert value(samples, total, model="unknown", code="NOT_FOUND") == 1


def test_load_errors_and_models_loaded(metrics: PrivateMetrics) -> None:
    metrics.model_load_error("broken")
    metrics.set_models_loaded(1)
    samples = scrape(metrics)
    assert value(samples, "splitvault_model_load_errors_total", model="broken") == 1
    assert value(samples, "splitvault_models_loaded") == 1


def test_metrics_server_serves_the_registry_on_its_own_port(metrics: PrivateMetrics) -> None:
    metrics.observe_request("digits", grpc.StatusCode.OK)
    metrics.set_models_loaded(2)
    port = start_metrics_server(metrics, "127.0.0.1", 0)
    assert port > 0
    response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    samples = parse(response.text)
    assert value(samples, "splitvault_private_requests_total", model="digits", code="OK") == 1
    assert value(samples, "splitvault_models_loaded") == 2
    assert not any(name.startswith("process_") or name.startswith("python_") for name, _ in samples)
    metrics.set_models_loaded(3)
    again = parse(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text)
    assert value(again, "splitvault_models_loaded") == 3


def test_metrics_server_refuses_a_second_start_and_stops(metrics: PrivateMetrics) -> None:
    port = start_metrics_server(metrics, "127.0.0.1", 0)
    with pytest.raises(RuntimeError, match="already running"):
        start_metrics_server(metrics, "127.0.0.1", 0)
    metrics.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
    assert start_metrics_server(metrics, "127.0.0.1", 0) > 0
