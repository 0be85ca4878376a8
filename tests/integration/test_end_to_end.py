"""Both tiers as real processes: the SDK and raw HTTP answer like the unsplit model."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from splitvault.demo import minilm
from splitvault.packing.spec import ModelSpec
from tests.conftest import DigitsFixture, Tiers
from tests.support.models import nested_spec
from tests.support.stack import image_request

pytestmark = pytest.mark.slow


def _unsplit_top_k(spec: ModelSpec, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    with torch.inference_mode():
        logits = spec.module(torch.from_numpy(x)).double()
    scores, indices = torch.topk(torch.softmax(logits, dim=-1), k, dim=-1)
    return indices.numpy(), scores.numpy()


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_sdk_top_k_matches_unsplit_digits(
    tiers: Tiers, digits_model: DigitsFixture, batch: int
) -> None:
    x = digits_model.data.test_x[:batch]
    expected_idx, expected_scores = _unsplit_top_k(digits_model.spec, x, 3)
    with tiers.client() as client:
        prediction = client.predict("digits", x)
    assert prediction.scores is not None and prediction.labels is not None
    np.testing.assert_array_equal(prediction.indices, expected_idx)
    # FP16 activations and 4-decimal rounding: scores agree to the rounding step.
    np.testing.assert_allclose(prediction.scores, expected_scores, atol=2e-3)
    assert (
        prediction.labels[0][0]
        == f"{['zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine'][expected_idx[0][0]]}"
    )


def test_raw_http_matches_sdk(tiers: Tiers, digits_model: DigitsFixture) -> None:
    x = digits_model.data.test_x[10:15]
    body = image_request(x, id="req-1")
    with tiers.http() as http:
        reply = http.post("/v2/models/digits/infer", json=body)
    assert reply.status_code == 200, reply.text
    payload = reply.json()
    assert payload["model_name"] == "digits"
    assert payload["id"] == "req-1"
    (output,) = payload["outputs"]
    assert output["name"] == "classification"
    assert output["datatype"] == "BYTES"
    assert output["shape"] == [5, 3]
    with tiers.client() as client:
        prediction = client.predict("digits", x)
    assert prediction.indices is not None
    parsed = [s.split(":") for s in output["data"]]
    assert [int(p[1]) for p in parsed] == prediction.indices.ravel().tolist()
    assert all(len(p[0].split(".")[-1]) <= 4 for p in parsed)  # rounded to the policy's 4 decimals


def test_client_asks_for_fewer_classes_but_never_more(
    tiers: Tiers, digits_model: DigitsFixture
) -> None:
    x = digits_model.data.test_x[:2]
    with tiers.client() as client:
        one, nine = client.predict("digits", x, top_k=1), client.predict("digits", x, top_k=9)
    assert one.indices is not None and nine.indices is not None
    assert one.indices.shape == (2, 1)
    assert nine.indices.shape == (2, 3)


def test_label_only_policy_returns_no_score(tiers: Tiers, digits_model: DigitsFixture) -> None:
    x = digits_model.data.test_x[:20]
    expected, _ = _unsplit_top_k(digits_model.spec, x, 1)
    with tiers.client() as client:
        prediction = client.predict("digits-label", x)
    assert prediction.scores is not None
    np.testing.assert_array_equal(prediction.indices, expected)
    assert np.isnan(prediction.scores).all()


def test_nested_split_serves_varied_token_counts(tiers: Tiers) -> None:
    spec = nested_spec()
    with tiers.client() as client:
        for batch, tokens in ((1, 1), (4, 9), (3, 32)):
            x = np.random.default_rng(batch).standard_normal((batch, tokens, 12)).astype(np.float32)
            expected_idx, expected_scores = _unsplit_top_k(spec, x, 2)
            prediction = client.predict("nested", x)
            assert prediction.scores is not None
            np.testing.assert_array_equal(prediction.indices, expected_idx)
            np.testing.assert_allclose(prediction.scores, expected_scores, atol=1.5e-6)


def test_minilm_embeddings_match_unsplit(tiers: Tiers, minilm_spec: ModelSpec) -> None:
    inputs = minilm.tokenize(minilm.SENTENCES)
    with torch.inference_mode():
        expected = minilm_spec.module(**inputs).numpy()
    arrays: dict[str, Any] = {name: tensor.numpy() for name, tensor in inputs.items()}
    with tiers.client() as client:
        embeddings = client.predict("minilm", arrays).embeddings
    assert embeddings is not None and embeddings.shape == expected.shape
    # FP16 activations (~4e-5) plus 5-decimal rounding (5e-6).
    np.testing.assert_allclose(embeddings, expected, atol=1e-4)
    similarity = embeddings @ embeddings.T
    assert similarity[0, 1] > similarity[0, 2]  # the two guitar sentences are closest


def test_metadata_and_readiness(tiers: Tiers) -> None:
    with tiers.client() as client:
        assert client.live()
        assert client.ready()
        assert client.model_ready("minilm")
        metadata = client.model_metadata("minilm")
    assert [t.name for t in metadata.inputs] == ["input_ids", "attention_mask", "text"]
    assert metadata.inputs[0].shape == (-1, -1)
    assert metadata.task == "embedding"
    with tiers.http() as http:
        reply = http.get("/openapi.json")
    assert "/v2/models/{model}/infer" in reply.json()["paths"]
