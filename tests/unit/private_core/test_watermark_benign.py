"""The watermark key's benign cost on labelled data, and the pack rule that redraws a key
whose cost is over the bound (``private_core.watermark.benign``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from structlog.testing import capture_logs

from private_core.policy import INDICES, apply_policy
from private_core.watermark.benign import BenignChunk, benign_cost, choose_key
from private_core.watermark.engine import ModelWatermark
from private_core.watermark.keys import WatermarkKey
from shared.manifest import ModelConfig, TopKPolicy, WatermarkConfig

CONFIG = ModelConfig(
    name="clf",
    split="features.1",
    task="classification",
    policy=TopKPolicy(k=3),
    watermark=WatermarkConfig(),
)
KEYS = [WatermarkKey(bytes([i + 1]) * 32) for i in range(6)]


def _chunks(n: int = 2000, seed: int = 0) -> list[BenignChunk]:
    """Activations, the logits of a fixed linear head and, as truth, the model's own top-1."""
    rng = np.random.default_rng(seed)
    activations = np.maximum(rng.normal(size=(n, 16, 4, 4)), 0).astype(np.float16)
    weights = np.random.default_rng(99).normal(size=(16 * 4 * 4, 10)) * 0.3
    logits = torch.from_numpy(activations.reshape(n, -1).astype(np.float64) @ weights)
    labels = logits.argmax(dim=1).numpy()
    half = n // 2
    return [
        BenignChunk({"act": activations[s]}, logits[s], labels[s])
        for s in (slice(0, half), slice(half, n))
    ]


def test_cost_is_the_accuracy_the_served_answers_lose() -> None:
    data = _chunks()
    watermark = ModelWatermark(CONFIG, KEYS[0])
    right = total = 0
    for chunk in data:
        probabilities = torch.softmax(chunk.output, dim=-1).numpy()
        marking = watermark.marking(chunk.inputs, probabilities)
        answered = np.asarray(apply_policy(CONFIG, chunk.output, 0, marking)[INDICES])[:, 0]
        right += int((answered == chunk.labels).sum())
        total += len(chunk.labels)
    cost = benign_cost(CONFIG, KEYS[0], data)
    assert cost == pytest.approx(1.0 - right / total)  # the model itself is right on every one
    assert 0.0 < cost < 0.5


def test_a_key_over_the_bound_is_redrawn_and_the_chosen_one_is_within_it() -> None:
    data = _chunks()
    costs = {key.key_id: benign_cost(CONFIG, key, data) for key in KEYS}
    dear, cheap = max(KEYS, key=lambda k: costs[k.key_id]), min(KEYS, key=lambda k: costs[k.key_id])
    assert costs[dear.key_id] > costs[cheap.key_id]
    bound = (costs[dear.key_id] + costs[cheap.key_id]) / 2
    with capture_logs() as logs:
        choice = choose_key(CONFIG, data, bound=bound, generate=iter([dear, cheap]).__next__)
    assert choice.key == cheap and choice.draws == 2
    assert choice.cost == benign_cost(CONFIG, choice.key, data) <= bound
    drawn = [e for e in logs if e["event"] == "watermark_key_drawn"]
    assert [(e["draw"], e["key_id"]) for e in drawn] == [(1, dear.key_id), (2, cheap.key_id)]


def test_when_every_draw_is_over_the_bound_the_cheapest_is_kept_and_said() -> None:
    data = _chunks()
    costs = [benign_cost(CONFIG, key, data) for key in KEYS[:3]]
    with capture_logs() as logs:
        choice = choose_key(CONFIG, data, bound=-1.0, max_draws=3, generate=iter(KEYS).__next__)
    assert choice.costs == tuple(costs)
    assert choice.key == KEYS[int(np.argmin(costs))] and choice.cost == min(costs)
    assert [e["event"] for e in logs][-1] == "watermark_key_over_bound"


def test_marks_that_answer_the_true_class_are_a_negative_cost() -> None:
    data = [
        BenignChunk(c.inputs, c.output, torch.topk(c.output, 2).indices[:, 1].numpy())
        for c in _chunks()
    ]
    assert benign_cost(CONFIG, KEYS[0], data) < 0.0
