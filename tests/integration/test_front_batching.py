"""The public tier batches front stages: concurrent MiniLM requests of different lengths,
through both tiers as real processes over mutual TLS, answer what the same requests answer one
at a time, and the public tier's metrics show front batches of several requests.

The public tier runs one front batch at a time with a 200 ms queue delay, so that requests
arriving while a batch runs share the next one whatever the machine's speed;
tests/unit/public_api/test_front_batcher.py shows sharing deterministically.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from splitvault_client import Client

from shared.layout import DeployLayout
from splitvault.demo import minilm
from tests.conftest import Deployment, issue_key
from tests.support.deployments import copy_deployment
from tests.support.processes import TierProcess, start_private, start_public
from tests.support.stack import tier_env

pytestmark = pytest.mark.slow

WORDS = " ".join(minilm.SENTENCES).split(" ")
FRONT_BATCHING = {
    "SPLITVAULT_PUBLIC_FRONT_BATCHING__CONCURRENT_BATCHES": "1",
    "SPLITVAULT_PUBLIC_FRONT_BATCHING__MAX_QUEUE_DELAY_US": "200000",
}


@dataclass
class Stack:
    layout: DeployLayout
    public: TierProcess
    key: str

    def client(self) -> Client:
        url = f"https://localhost:{self.public.port}"
        return Client(url, api_key=self.key, ca=self.layout.public.ca_cert)

    def front_batches(self) -> tuple[float, float, float]:
        """(front batches, rows in them, batches of one row) for MiniLM, from the metrics."""
        body = httpx.get(f"http://127.0.0.1:{self.public.metrics_port}/metrics", timeout=10).text
        samples = {
            (s.name, s.labels.get("le")): s.value
            for family in text_string_to_metric_families(body)
            for s in family.samples
            if s.labels.get("model") == "minilm"
        }
        return (
            samples.get(("splitvault_front_batch_size_count", None), 0.0),
            samples.get(("splitvault_front_batch_size_sum", None), 0.0),
            samples.get(("splitvault_front_batch_size_bucket", "1.0"), 0.0),
        )


@pytest.fixture(scope="module")
def stack(deployment: Deployment, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    layout = copy_deployment(
        deployment.layout,
        tmp_path_factory.mktemp("front-batching") / "d",
        skip_models={"digits", "digits-label", "nested"},
        keep_public_state=False,
    )
    key = issue_key(layout, "front-batching")
    private = start_private(layout.root, env=tier_env())
    try:
        public = start_public(layout.root, private.port, env={**tier_env(), **FRONT_BATCHING})
        try:
            yield Stack(layout, public, key)
        finally:
            public.stop()
    finally:
        private.stop()


def _sentences(i: int) -> list[str]:
    """One or two sentences of 3 to 36 words: every request has its own sequence length."""
    first = " ".join(WORDS[j % len(WORDS)] for j in range(3 + 3 * i))
    return [first, "A short one."] if i % 4 == 3 else [first]


def test_concurrent_minilm_equals_sequential(stack: Stack) -> None:
    requests = [
        {name: t.numpy() for name, t in minilm.tokenize(_sentences(i)).items()} for i in range(12)
    ]
    assert len({r["input_ids"].shape[1] for r in requests}) == 12

    def embed(inputs: dict[str, Any]) -> Callable[[], Any]:
        def call() -> Any:
            with stack.client() as client:
                return client.predict("minilm", inputs).embeddings

        return call

    alone = [embed(inputs)() for inputs in requests]  # one at a time: batches of one request
    before = stack.front_batches()
    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(lambda call: call(), [embed(x) for x in requests]))
    after = stack.front_batches()
    for inputs, batched, single in zip(requests, together, alone, strict=True):
        assert batched.shape == single.shape == (len(inputs["input_ids"]), 384)
        # Rounded to 5 decimals by the policy; padding may move a value across a rounding edge.
        np.testing.assert_allclose(batched, single, atol=1e-5 + 1e-12)
    rows = sum(len(r["input_ids"]) for r in requests)
    assert after[1] - before[1] == rows  # every row ran through the front exactly once
    batches = after[0] - before[0]
    assert batches < len(requests), "no two concurrent requests shared a front batch"
