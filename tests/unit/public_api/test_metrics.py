"""Tests of the public tier's metrics, read back through prometheus-client's text parser."""

from __future__ import annotations

import pytest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from public_api.metrics import LATENCY_BUCKETS, PublicMetrics


def scrape(metrics: PublicMetrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of ``render()``: (sample name, labels) -> value."""
    body, content_type = metrics.render()
    assert content_type == CONTENT_TYPE_LATEST
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


def value(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return samples[(name, frozenset(labels.items()))]


def risk_keys(metrics: PublicMetrics) -> dict[str, float]:
    return {
        dict(labels)["key_id"]: v
        for (name, labels), v in scrape(metrics).items()
        if name == "splitvault_key_risk_score"
    }


@pytest.fixture
def metrics() -> PublicMetrics:
    return PublicMetrics.create(["digits", "minilm"])


def test_observe_request_counts_by_model_and_status_and_times_the_request(
    metrics: PublicMetrics,
) -> None:
    metrics.observe_request("digits", 200, 0.004)
    metrics.observe_request("digits", 200, 0.2)
    metrics.observe_request("digits", 429, 0.001)
    metrics.observe_request("minilm", 503, 3.0)
    samples = scrape(metrics)
    assert value(samples, "splitvault_requests_total", model="digits", status="200") == 2
    assert value(samples, "splitvault_requests_total", model="digits", status="429") == 1
    assert value(samples, "splitvault_requests_total", model="minilm", status="503") == 1
    assert value(samples, "splitvault_request_seconds_count", model="digits") == 3
    assert value(samples, "splitvault_request_seconds_sum", model="digits") == pytest.approx(0.205)
    assert value(samples, "splitvault_request_seconds_bucket", model="digits", le="0.005") == 2
    assert value(samples, "splitvault_request_seconds_bucket", model="minilm", le="2.5") == 0
    assert value(samples, "splitvault_request_seconds_bucket", model="minilm", le="5.0") == 1


def test_undeployed_model_names_collapse_to_unknown(metrics: PublicMetrics) -> None:
    for name in ("nope", "../etc/passwd", "x" * 500):
        metrics.observe_request(name, 404, 0.001)
    metrics.rate_limited("made-up", "ip")
    samples = scrape(metrics)
    assert value(samples, "splitvault_requests_total", model="unknown", status="404") == 3
    assert value(samples, "splitvault_rate_limited_total", model="unknown", scope="ip") == 1
    models = {dict(labels).get("model") for (_, labels) in samples}
    assert models <= {None, "digits", "minilm", "unknown"}


def test_deployed_models_export_zero_series_before_any_request(metrics: PublicMetrics) -> None:
    samples = scrape(metrics)
    for model in ("digits", "minilm"):
        assert value(samples, "splitvault_front_seconds_count", model=model) == 0
        assert value(samples, "splitvault_blocked_total", model=model) == 0
    assert value(samples, "splitvault_unauthenticated_total") == 0


def test_front_and_private_call_histograms_cover_1ms_to_10s(metrics: PublicMetrics) -> None:
    assert LATENCY_BUCKETS[0] == 0.001 and LATENCY_BUCKETS[-1] == 10.0
    metrics.observe_front("digits", 0.003)
    metrics.observe_private_call("digits", 0.03)
    metrics.observe_private_call("digits", 12.0)
    samples = scrape(metrics)
    assert value(samples, "splitvault_front_seconds_bucket", model="digits", le="0.0025") == 0
    assert value(samples, "splitvault_front_seconds_bucket", model="digits", le="0.005") == 1
    assert value(samples, "splitvault_private_call_seconds_bucket", model="digits", le="0.025") == 0
    assert value(samples, "splitvault_private_call_seconds_bucket", model="digits", le="0.05") == 1
    assert value(samples, "splitvault_private_call_seconds_bucket", model="digits", le="10.0") == 1
    assert value(samples, "splitvault_private_call_seconds_bucket", model="digits", le="+Inf") == 2
    assert value(samples, "splitvault_private_call_seconds_count", model="minilm") == 0


def test_rate_limited_blocked_and_unauthenticated_counts(metrics: PublicMetrics) -> None:
    for scope in ("key", "key", "ip", "quota"):
        metrics.rate_limited("digits", scope)
    metrics.blocked("minilm")
    metrics.unauthenticated()
    metrics.unauthenticated()
    samples = scrape(metrics)
    assert value(samples, "splitvault_rate_limited_total", model="digits", scope="key") == 2
    assert value(samples, "splitvault_rate_limited_total", model="digits", scope="ip") == 1
    assert value(samples, "splitvault_rate_limited_total", model="digits", scope="quota") == 1
    assert value(samples, "splitvault_blocked_total", model="minilm") == 1
    assert value(samples, "splitvault_blocked_total", model="digits") == 0
    assert value(samples, "splitvault_unauthenticated_total") == 2


def test_rate_limited_refuses_an_unknown_scope(metrics: PublicMetrics) -> None:
    with pytest.raises(ValueError, match="scope"):
        metrics.rate_limited("digits", "country")
    assert not any(name == "splitvault_rate_limited_total" for name, _ in scrape(metrics))


def test_audit_pending_and_private_ready_gauges(metrics: PublicMetrics) -> None:
    metrics.set_audit_pending(17)
    metrics.set_private_ready(True)
    samples = scrape(metrics)
    assert value(samples, "splitvault_audit_pending") == 17
    assert value(samples, "splitvault_private_ready") == 1
    metrics.set_audit_pending(0)
    metrics.set_private_ready(False)
    samples = scrape(metrics)
    assert value(samples, "splitvault_audit_pending") == 0
    assert value(samples, "splitvault_private_ready") == 0


def test_risk_gauge_keeps_the_highest_scores_and_evicts_the_lowest() -> None:
    metrics = PublicMetrics.create(["digits"], max_risk_keys=3)
    metrics.set_risk("k_a", 0.5)
    metrics.set_risk("k_b", 0.9)
    metrics.set_risk("k_c", 0.2)
    assert risk_keys(metrics) == {"k_a": 0.5, "k_b": 0.9, "k_c": 0.2}
    metrics.set_risk("k_d", 0.7)
    assert risk_keys(metrics) == {"k_a": 0.5, "k_b": 0.9, "k_d": 0.7}
    metrics.set_risk("k_e", 0.1)  # lower than every kept key: never shown
    assert risk_keys(metrics) == {"k_a": 0.5, "k_b": 0.9, "k_d": 0.7}
    metrics.set_risk("k_b", 0.3)  # an update replaces the score without evicting anyone
    assert risk_keys(metrics) == {"k_a": 0.5, "k_b": 0.3, "k_d": 0.7}
    metrics.set_risk("k_f", 0.4)
    assert risk_keys(metrics) == {"k_a": 0.5, "k_d": 0.7, "k_f": 0.4}


def test_risk_gauge_default_bound_is_50_top_keys(metrics: PublicMetrics) -> None:
    for i in range(200):
        metrics.set_risk(f"k_{i:08x}", (i * 37 % 200) / 200)
    kept = risk_keys(metrics)
    assert len(kept) == 50
    assert min(kept.values()) == 150 / 200
    assert sorted(kept.values()) == [i / 200 for i in range(150, 200)]


def test_risk_bound_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_risk_keys"):
        PublicMetrics.create(["digits"], max_risk_keys=0)


def test_two_instances_in_one_process_keep_separate_registries() -> None:
    first = PublicMetrics.create(["digits"])
    second = PublicMetrics.create(["digits"])
    first.observe_request("digits", 200, 0.01)
    assert value(scrape(first), "splitvault_requests_total", model="digits", status="200") == 1
    assert (
        "splitvault_requests_total",
        frozenset({("model", "digits"), ("status", "200")}),
    ) not in (scrape(second))
