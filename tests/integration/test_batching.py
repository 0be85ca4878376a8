"""Dynamic batching through both tiers: concurrent answers equal unbatched ones, and a full
private queue answers 503 with Retry-After without hanging or stopping service.

Which concurrent requests share a batch depends on timing; tests/unit/private_core/test_batcher.py
drives the batcher with held batches to show sharing deterministically.
"""

from __future__ import annotations

import itertools
import ssl
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

import httpx
import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

import private_core.server
from private_core.settings import PrivateSettings
from shared.layout import DeployLayout
from splitvault.demo import minilm
from splitvault.packing.spec import ModelSpec
from tests.conftest import Deployment, DigitsFixture, Tiers, issue_key
from tests.support.deployments import copy_deployment
from tests.support.inprocess import GatedPool, ThreadedPrivateTier
from tests.support.processes import TierProcess, start_public
from tests.support.stack import image_request, tier_env

pytestmark = pytest.mark.slow

T = TypeVar("T")
P = ParamSpec("P")
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
    assert after[1] - before[1] == sum(DIGITS_SIZES)  # every row ran once, batched or not


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


# --- a full private queue ---------------------------------------------------------------------
#
# Whether concurrent requests fill a queue depends on how fast the machine drains it, so the
# private tier here is the real server (build_server: gRPC over mutual TLS, servicer, batcher,
# digits back stage) on an event loop in a thread of this process, with a back-stage pool
# that holds each batch until the test opens its gate. Its queue holds one row and one batch
# runs at a time: with one batch held, one request waits in the queue and the next is refused.


@dataclass
class Crowded:
    """A digits-only copy of the deployment: its gated private tier, a public tier, a key."""

    layout: DeployLayout
    private: ThreadedPrivateTier
    public: TierProcess
    key: str

    @property
    def pool(self) -> GatedPool:
        pool = self.private.server.executor
        assert isinstance(pool, GatedPool)
        return pool

    def post(self, x: np.ndarray) -> httpx.Response:
        context = ssl.create_default_context(cafile=str(self.layout.public.ca_cert))
        body = image_request(x)
        headers = {"Authorization": f"Bearer {self.key}"}
        url = f"https://localhost:{self.public.port}"
        with httpx.Client(base_url=url, verify=context, headers=headers, timeout=120) as http:
            return http.post("/v2/models/digits/infer", json=body)


def _crowded_private(layout: DeployLayout) -> ThreadedPrivateTier:
    settings = PrivateSettings.load(
        layout.private_config,
        tier_dir=layout.private.root,
        kek_file=layout.kek,
        port=0,
        metrics_port=None,
        torch_threads=1,
        concurrent_batches=1,
        max_queue_size=1,
        lock_memory=False,
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(private_core.server, "ThreadPoolExecutor", GatedPool)
        # gc.freeze in the test process would keep every later test's garbage for ever.
        patch.setattr(private_core.server, "freeze_startup_objects", lambda: 0)
        return ThreadedPrivateTier(settings)


@pytest.fixture(scope="module")
def crowded(deployment: Deployment, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Crowded]:
    destination = tmp_path_factory.mktemp("crowded") / "d"
    skip = {"minilm", "nested", "digits-label"}
    layout = copy_deployment(
        deployment.layout, destination, skip_models=skip, keep_public_state=False
    )
    key = issue_key(layout, "crowded")
    private = _crowded_private(layout)
    try:
        # A queued request waits for the test, not for the default 5 s private deadline.
        env = {**tier_env(), "SPLITVAULT_PUBLIC_REQUEST_TIMEOUT_S": "120"}
        public = start_public(layout.root, private.server.port, env=env)
        try:
            yield Crowded(layout, private, public, key)
        finally:
            public.stop()
    finally:
        private.stop()


def test_full_queue_answers_503_with_retry_after(
    crowded: Crowded, digits_model: DigitsFixture
) -> None:
    x = digits_model.data.test_x[:1]
    with ThreadPoolExecutor(3) as clients, crowded.pool.holding() as handed:
        running = clients.submit(crowded.post, x)
        assert handed.acquire(timeout=60), "the first request's batch never reached the pool"
        # Its batch holds the only slot: of the next two, the first to arrive is queued (1 row,
        # the limit) and the other is refused, whichever order they arrive in.
        racing = {clients.submit(crowded.post, x) for _ in range(2)}
        done, waiting = wait(racing, timeout=60, return_when=FIRST_COMPLETED)
        assert len(done) == 1 and len(waiting) == 1, "neither request was refused"
        (refused,) = (future.result() for future in done)
    assert refused.status_code == 503, refused.text
    assert int(refused.headers["retry-after"]) >= 1
    assert "overloaded" in refused.json()["error"]
    assert running.result().status_code == 200  # both released when the gate opened
    assert next(iter(waiting)).result().status_code == 200
    assert crowded.post(x).status_code == 200  # still serving
