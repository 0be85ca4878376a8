"""Dynamic batching through both tiers: concurrent answers equal unbatched ones, batches form,
and a full private queue answers 503 with Retry-After without hanging or stopping service."""

from __future__ import annotations

import itertools
import ssl
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import httpx
import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from splitvault.demo import minilm
from splitvault.packing.spec import ModelSpec
from tests.conftest import Deployment, DigitsFixture, Tiers
from tests.support.processes import TierProcess, start_private, start_public
from tests.support.stack import tier_env

pytestmark = pytest.mark.slow

T = TypeVar("T")
DIGITS_SIZES = [1 + (i * 5) % 9 for i in range(32)]  # 1..9 rows, 32 requests
WORDS = " ".join(minilm.SENTENCES).split(" ")


def _concurrently(calls: list[Callable[[], T]]) -> list[T]:
    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(lambda call: call(), calls))


def _batch_counts(tier: TierProcess, model: str) -> tuple[float, float, float]:
    """(batches, rows in them, batches of one row) the private tier has run for ``model``."""
    (port,) = [
        e["metrics_port"] for e in tier.events() if e.get("event") == "private_tier_listening"
    ]
    body = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    samples = {
        (s.name, s.labels.get("le")): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
        if s.labels.get("model") == model
    }
    return (
        samples.get(("splitvault_private_batch_size_count", None), 0.0),
        samples.get(("splitvault_private_batch_size_sum", None), 0.0),
        samples.get(("splitvault_private_batch_size_bucket", "1.0"), 0.0),
    )


def test_concurrent_digits_answers_equal_unbatched(
    tiers: Tiers, digits_model: DigitsFixture
) -> None:
    starts = np.cumsum([0, *DIGITS_SIZES])
    images = [digits_model.data.test_x[a:b] for a, b in itertools.pairwise(starts)]
    before = _batch_counts(tiers.private, "digits")

    def predict(x: np.ndarray) -> Callable[[], Any]:
        def call() -> Any:
            with tiers.client() as client:
                return client.predict("digits", x)

        return call

    together = _concurrently([predict(x) for x in images])
    after = _batch_counts(tiers.private, "digits")
    alone = [predict(x)() for x in images]
    with torch.inference_mode():
        logits = digits_model.spec.module(torch.from_numpy(np.concatenate(images))).double()
    expected = torch.topk(torch.softmax(logits, dim=-1), 3, dim=-1).indices.numpy()
    got = np.concatenate([p.indices for p in together])
    np.testing.assert_array_equal(got, expected)
    for batched, single in zip(together, alone, strict=True):
        np.testing.assert_array_equal(batched.indices, single.indices)
        np.testing.assert_allclose(batched.scores, single.scores, atol=1e-4 + 1e-12)  # 4 dp
    assert after[1] - before[1] == sum(DIGITS_SIZES)
    assert after[0] - before[0] < len(images), "no two concurrent requests shared a batch"


def _sentences(i: int) -> list[str]:
    """One or two sentences of 3 to 48 words: every request has its own sequence length."""
    first = " ".join(WORDS[j % len(WORDS)] for j in range(3 + 3 * i))
    return [first, "A short one."] if i % 4 == 3 else [first]


def test_concurrent_minilm_lengths_equal_unbatched(tiers: Tiers, minilm_spec: ModelSpec) -> None:
    requests = [
        {name: t.numpy() for name, t in minilm.tokenize(_sentences(i)).items()} for i in range(16)
    ]
    assert len({r["input_ids"].shape[1] for r in requests}) == 16
    before = _batch_counts(tiers.private, "minilm")

    def embed(inputs: dict[str, Any]) -> Callable[[], Any]:
        def call() -> Any:
            with tiers.client() as client:
                return client.predict("minilm", inputs).embeddings

        return call

    together = _concurrently([embed(inputs) for inputs in requests])
    after = _batch_counts(tiers.private, "minilm")
    for inputs, batched in zip(requests, together, strict=True):
        single = embed(inputs)()
        np.testing.assert_allclose(batched, single, atol=1e-5 + 1e-12)  # 5 dp
        with torch.inference_mode():
            unsplit = minilm_spec.module(**{k: torch.from_numpy(v) for k, v in inputs.items()})
        np.testing.assert_allclose(batched, unsplit.numpy(), atol=1e-4)  # FP16 transport
    single_row_batches = after[2] - before[2]
    assert after[0] - before[0] > single_row_batches, "every MiniLM batch held one sentence"


@pytest.fixture(scope="module")
def crowded(deployment: Deployment) -> Iterator[tuple[TierProcess, TierProcess]]:
    """A private tier whose queue holds 2 rows and waits up to 1 s to fill a batch."""
    env = {
        **tier_env(),
        "SPLITVAULT_PRIVATE_MAX_QUEUE_SIZE": "2",
        "SPLITVAULT_PRIVATE_MAX_QUEUE_DELAY_US": "1000000",
    }
    private = start_private(deployment.root, env=env)
    try:
        public = start_public(deployment.root, private.port, env=tier_env())
    except BaseException:
        private.stop()
        raise
    yield private, public
    public.stop()
    private.stop()


def test_full_queue_answers_503_with_retry_after(
    deployment: Deployment, crowded: tuple[TierProcess, TierProcess], digits_model: DigitsFixture
) -> None:
    _, public = crowded
    context = ssl.create_default_context(cafile=str(deployment.ca_cert))
    x = digits_model.data.test_x[:1]
    body = {
        "inputs": [
            {"name": "image", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": x.ravel().tolist()}
        ]
    }

    def post() -> httpx.Response:
        with httpx.Client(
            base_url=f"https://localhost:{public.port}",
            verify=context,
            headers=deployment.auth_headers,
            timeout=30,
        ) as http:
            return http.post("/v2/models/digits/infer", json=body)

    replies = _concurrently([post] * 24)
    statuses = sorted(reply.status_code for reply in replies)
    assert set(statuses) == {200, 503}, statuses
    for reply in replies:
        if reply.status_code == 503:
            assert int(reply.headers["retry-after"]) >= 1
            assert "overloaded" in reply.json()["error"]
    assert post().status_code == 200  # still serving
