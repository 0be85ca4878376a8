"""Output policies: only rounded top-k probabilities, a label or rounded embeddings leave."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from private_core.policy import EMBEDDING, INDICES, SCORES, apply_policy
from shared.manifest import LabelPolicy, ModelConfig, RoundingPolicy, TopKPolicy


def _classifier(policy: TopKPolicy | LabelPolicy) -> ModelConfig:
    return ModelConfig(name="clf", split="features.1", task="classification", policy=policy)


def _embedder(decimals: int) -> ModelConfig:
    return ModelConfig(
        name="emb",
        split="encoder.layer.1",
        task="embedding",
        policy=RoundingPolicy(decimals=decimals),
    )


@pytest.fixture
def logits() -> torch.Tensor:
    torch.manual_seed(3)
    return torch.randn(6, 10) * 4


@pytest.mark.parametrize(
    ("policy_k", "requested", "expected_k"),
    [(3, 0, 3), (3, 1, 1), (3, 2, 2), (3, 3, 3), (3, 9, 3), (5, 100, 5), (20, 0, 10)],
)
def test_top_k_caps_k_by_policy_request_and_classes(
    logits: torch.Tensor, policy_k: int, requested: int, expected_k: int
) -> None:
    out = apply_policy(_classifier(TopKPolicy(k=policy_k)), logits, requested)
    assert set(out) == {INDICES, SCORES}
    assert out[INDICES].shape == (6, expected_k)
    assert out[SCORES].shape == (6, expected_k)
    assert out[INDICES].dtype == np.int64


def test_top_k_indices_and_scores_match_torch(logits: torch.Tensor) -> None:
    out = apply_policy(_classifier(TopKPolicy(k=4, decimals=6)), logits)
    probabilities = torch.softmax(logits.double(), dim=-1)
    scores, indices = torch.topk(probabilities, 4, dim=-1)
    np.testing.assert_array_equal(out[INDICES], indices.numpy())
    np.testing.assert_allclose(out[SCORES], scores.numpy(), atol=5e-7)


@pytest.mark.parametrize("decimals", [0, 1, 2, 4, 8])
def test_scores_are_rounded_to_decimals(logits: torch.Tensor, decimals: int) -> None:
    out = apply_policy(_classifier(TopKPolicy(k=3, decimals=decimals)), logits)
    scores = out[SCORES]
    np.testing.assert_array_equal(scores, np.round(scores, decimals))
    exact = torch.topk(torch.softmax(logits.double(), dim=-1), 3).values.numpy()
    assert np.abs(scores - exact).max() <= 0.5 * 10.0**-decimals + 1e-12


def test_scores_are_sorted_descending_probabilities(logits: torch.Tensor) -> None:
    out = apply_policy(_classifier(TopKPolicy(k=10, decimals=8)), logits)
    scores = out[SCORES]
    assert (np.diff(scores, axis=-1) <= 0).all()
    assert ((scores >= 0) & (scores <= 1)).all()
    np.testing.assert_allclose(scores.sum(axis=-1), 1.0, atol=1e-7)  # all 10 classes
    assert sorted(out[INDICES][0].tolist()) == list(range(10))


@pytest.mark.parametrize("scale", [1.0, 1000.0, -50.0])
def test_no_raw_logits_leave(logits: torch.Tensor, scale: float) -> None:
    """Scaled logits still yield softmax probabilities in [0, 1], never the logits themselves."""
    scaled = logits * scale
    out = apply_policy(_classifier(TopKPolicy(k=3, decimals=4)), scaled)
    scores = out[SCORES]
    assert ((scores >= 0) & (scores <= 1)).all()
    expected = torch.topk(torch.softmax(scaled.double(), dim=-1), 3)
    np.testing.assert_array_equal(scores, np.round(expected.values.numpy(), 4))
    np.testing.assert_array_equal(out[INDICES], expected.indices.numpy())
    top_logits = torch.topk(scaled.double(), 3).values.numpy()
    assert not np.allclose(scores, np.round(top_logits, 4))


def test_scores_do_not_reveal_the_logit_offset(logits: torch.Tensor) -> None:
    config = _classifier(TopKPolicy(k=3, decimals=6))
    shifted = apply_policy(config, logits + 123.0)
    plain = apply_policy(config, logits)
    np.testing.assert_array_equal(shifted[INDICES], plain[INDICES])
    np.testing.assert_allclose(shifted[SCORES], plain[SCORES], atol=1e-6)


def test_huge_logits_saturate_to_one_without_overflow() -> None:
    logits = torch.tensor([[1000.0, 0.0, -1000.0], [5e30, 4e30, 0.0]])
    out = apply_policy(_classifier(TopKPolicy(k=2, decimals=4)), logits)
    np.testing.assert_array_equal(out[SCORES], [[1.0, 0.0], [1.0, 0.0]])
    np.testing.assert_array_equal(out[INDICES], [[0, 1], [0, 1]])
    assert np.isfinite(out[SCORES]).all()


def test_label_policy_returns_argmax_only(logits: torch.Tensor) -> None:
    out = apply_policy(_classifier(LabelPolicy()), logits, requested_k=5)
    assert set(out) == {INDICES}
    assert out[INDICES].shape == (6, 1)
    assert out[INDICES].dtype == np.int64
    np.testing.assert_array_equal(out[INDICES][:, 0], logits.argmax(dim=-1).numpy())


@pytest.mark.parametrize("decimals", [0, 3, 5])
def test_rounding_policy_rounds_embeddings(decimals: int) -> None:
    torch.manual_seed(0)
    embedding = torch.nn.functional.normalize(torch.randn(4, 384), dim=-1)
    out = apply_policy(_embedder(decimals), embedding)
    assert set(out) == {EMBEDDING}
    values = out[EMBEDDING]
    assert values.shape == (4, 384)
    assert values.dtype == np.float64
    np.testing.assert_array_equal(values, np.round(values, decimals))
    exact = embedding.double().numpy()
    assert np.abs(values - exact).max() <= 0.5 * 10.0**-decimals + 1e-12
    assert not np.array_equal(values, exact)


def test_rounding_policy_output_has_short_decimal_form() -> None:
    out = apply_policy(_embedder(3), torch.tensor([[0.1234567, -0.9876543]]))
    assert [repr(v) for v in out[EMBEDDING].ravel().tolist()] == ["0.123", "-0.988"]
