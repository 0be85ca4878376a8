"""Threads per call through both tiers: lone MiniLM requests run on two threads and on one
(each tier tries both counts for a model, then keeps the faster), the answers agree, and each
tier counts its calls by thread count in ``splitvault_compute_calls_total``."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from shared.layout import DeployLayout
from splitvault.demo import minilm
from splitvault.launcher import TierProcess, start_both
from tests.conftest import Deployment, issue_key
from tests.support.stack import copy_deployment, https, tier_env

pytestmark = pytest.mark.slow
LONE_TWO = {
    "SPLITVAULT_PRIVATE_LONE_REQUEST_THREADS": "2",
    "SPLITVAULT_PUBLIC_LONE_REQUEST_THREADS": "2",
    # Two OpenMP threads on a busy shared host can take seconds: no 5 s private deadline.
    "SPLITVAULT_PUBLIC_REQUEST_TIMEOUT_S": "120",
}


@pytest.fixture(scope="module")
def tiers(
    deployment: Deployment, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[DeployLayout, TierProcess, TierProcess, str]]:
    skip = {"digits", "digits-label", "nested"}
    layout = copy_deployment(deployment.root, tmp_path_factory.mktemp("threads") / "d", skip)
    key = issue_key(layout, "threads")
    with ExitStack() as stack:
        public, private = start_both(layout.root, stack, env={**tier_env(), **LONE_TWO})
        yield layout, public, private, key


def _calls(tier: TierProcess) -> dict[str, float]:
    body = httpx.get(tier.metrics_url, timeout=10).text
    return {
        sample.labels["threads"]: sample.value
        for family in text_string_to_metric_families(body)
        if family.name == "splitvault_compute_calls"
        for sample in family.samples
    }


def _request() -> dict[str, Any]:
    tokens = minilm.tokenize(minilm.SENTENCES[:1])
    inputs = [
        {"name": name, "shape": list(t.shape), "datatype": "INT64", "data": t.ravel().tolist()}
        for name, t in tokens.items()
    ]
    return {"inputs": inputs}


def test_lone_requests_try_both_thread_counts_and_agree(
    tiers: tuple[DeployLayout, TierProcess, TierProcess, str],
) -> None:
    layout, public, private, key = tiers
    answers = []
    with https(layout, public.port, key, timeout=120) as http:
        for _ in range(3):  # one after another: each is alone in both tiers
            reply = http.post("/v2/models/minilm/infer", json=_request())
            assert reply.status_code == 200, reply.text
            answers.append(np.asarray(reply.json()["outputs"][0]["data"], dtype=np.float64))
    for tier in (public, private):
        calls = _calls(tier)
        # The first lone call of a model tries two threads, the second one thread.
        assert calls.get("2", 0) >= 1 and calls.get("1", 0) >= 1, calls
        assert sum(calls.values()) >= 3
    # Two threads sum in another order than one: equal within float rounding.
    np.testing.assert_allclose(answers[0], answers[1], atol=1e-5)
    np.testing.assert_allclose(answers[0], answers[2], atol=1e-5)
