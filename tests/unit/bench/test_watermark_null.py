"""The null calibration's shortcut: a key's benign cost on the unsure rows alone, against a
scaled bound, makes ``choose_key`` choose exactly as on all rows (``bench/watermark_null.py``)."""

from __future__ import annotations

import itertools

import numpy as np
import torch

from bench.watermark_null import unsure_rows
from private_core.watermark.benign import BenignChunk, benign_cost, choose_key
from private_core.watermark.keys import WatermarkKey
from shared.manifest import ModelConfig, TopKPolicy, WatermarkConfig

CONFIG = ModelConfig(
    name="clf",
    split="features.1",
    task="classification",
    policy=TopKPolicy(k=3),
    watermark=WatermarkConfig(),
)
KEYS = [WatermarkKey(bytes([i + 1]) * 32) for i in range(5)]


def _chunks(n: int = 1200) -> list[BenignChunk]:
    """Activations, a fixed linear head's logits, and labels that are right 80% of the time."""
    rng = np.random.default_rng(3)
    activations = np.maximum(rng.normal(size=(n, 16, 4, 4)), 0).astype(np.float16)
    weights = np.random.default_rng(99).normal(size=(16 * 4 * 4, 10)) * 0.3
    logits = torch.from_numpy(activations.reshape(n, -1).astype(np.float64) @ weights)
    labels = logits.argmax(dim=1).numpy()
    wrong = rng.random(n) < 0.2
    labels[wrong] = rng.integers(10, size=int(wrong.sum()))
    return [
        BenignChunk({"act": activations[s]}, logits[s], labels[s])
        for s in (slice(0, n // 3), slice(n // 3, n))
    ]


def test_the_unsure_rows_alone_choose_the_same_key_after_the_same_draws() -> None:
    full = _chunks()
    assert CONFIG.watermark is not None
    reduced = [unsure_rows(full, CONFIG.watermark.max_margin)]
    rows, kept = sum(len(c.labels) for c in full), len(reduced[0].labels)
    assert 0 < kept < rows
    costs = [benign_cost(CONFIG, key, full) for key in KEYS]
    for key, cost in zip(KEYS, costs, strict=True):  # the same samples lost, key by key
        assert round(benign_cost(CONFIG, key, reduced) * kept) == round(cost * rows)
    bound = float(np.median(costs))
    assert min(costs) <= bound < max(costs)  # some keys pass, some are redrawn
    for order in itertools.permutations(KEYS, 2):
        on_all = choose_key(CONFIG, full, bound=bound, max_draws=2, generate=iter(order).__next__)
        on_unsure = choose_key(
            CONFIG, reduced, bound=bound * rows / kept, max_draws=2, generate=iter(order).__next__
        )
        assert (on_unsure.key, on_unsure.draws) == (on_all.key, on_all.draws)
