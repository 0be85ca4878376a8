"""Region marks: keyed partition, runner-up answers where unsure, and the region-level exact test."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from private_core.policy import INDICES, SCORES, restrict, restrict_many
from private_core.watermark.engine import ModelWatermark, QueryContext
from private_core.watermark.keys import WatermarkKey
from private_core.watermark.regions import RegionMarker, top_two, unsure
from private_core.watermark.triggers import read_triggers
from shared.manifest import LabelPolicy, ModelConfig, TopKPolicy, WatermarkConfig
from splitvault.ownership.stats import region_test, region_votes

KEY = WatermarkKey(bytes(range(32)))
CLASSES = 10
NAME = "act"


def _activations(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.maximum(rng.normal(size=(n, 16, 4, 4)), 0).astype(np.float16)


def _logits(activations: np.ndarray) -> torch.Tensor:
    weights = np.random.default_rng(99).normal(size=(16 * 4 * 4, CLASSES)) * 0.3
    return torch.from_numpy(activations.reshape(len(activations), -1).astype(np.float64) @ weights)


def _stage(policy: TopKPolicy | LabelPolicy, **settings: object) -> SimpleNamespace:
    config = ModelConfig(
        name="clf",
        split="features.1",
        task="classification",
        policy=policy,
        watermark=WatermarkConfig(**settings),  # type: ignore[arg-type]
    )
    return SimpleNamespace(config=config, watermark=ModelWatermark(config, KEY))


def test_watermark_is_on_by_default_with_region_marks() -> None:
    settings = WatermarkConfig()
    assert settings.enabled and settings.marks == "region"


def test_marked_answers_are_the_runner_up_only_where_unsure_in_selected_regions() -> None:
    x = _activations(3000)
    logits = _logits(x)
    p = torch.softmax(logits, dim=1).numpy()
    stage = _stage(TopKPolicy(k=3), region_fraction=0.5)
    answer = restrict(stage, logits, {NAME: x})  # type: ignore[arg-type]
    pairs = top_two(p)
    marker: RegionMarker = stage.watermark.regions
    selected = marker.selected(marker.regions({NAME: x}, pairs))
    marked = selected & unsure(p, 0.5)
    assert 0 < marked.sum() < len(x)  # the test data exercises both cases
    np.testing.assert_array_equal(answer[INDICES][marked, 0], pairs[marked, 1])
    np.testing.assert_array_equal(answer[INDICES][~marked, 0], pairs[~marked, 0])
    np.testing.assert_allclose(answer[SCORES][:, 0], np.round(np.sort(p, 1)[:, -1], 4))


def test_label_policy_marks_the_same_queries_as_top_k() -> None:
    x = _activations(500, seed=3)
    logits = _logits(x)
    top_k = restrict(_stage(TopKPolicy(k=3)), logits, {NAME: x})  # type: ignore[arg-type]
    label = restrict(_stage(LabelPolicy()), logits, {NAME: x})  # type: ignore[arg-type]
    np.testing.assert_array_equal(top_k[INDICES][:, 0], label[INDICES][:, 0])


def test_a_region_is_stable_under_small_noise_and_batching_but_partitions_the_data() -> None:
    rng = np.random.default_rng(5)
    centres = _activations(20, seed=5).astype(np.float32)  # clustered, like natural data
    x = (centres[rng.integers(20, size=2000)] + rng.normal(0, 0.05, (2000, 16, 4, 4))).clip(0)
    x = x.astype(np.float16)
    pairs = np.tile(np.array([[0, 1]]), (2000, 1))
    marker = RegionMarker(KEY, 0.3, dims=4, cell=0.5)
    ids = marker.regions({NAME: x}, pairs)
    noisy = x.astype(np.float32) * (1 + rng.normal(0, 0.002, x.shape))
    again = marker.regions({NAME: noisy.astype(np.float16)}, pairs)
    one_by_one = [marker.regions({NAME: x[i : i + 1]}, pairs[i : i + 1])[0] for i in range(50)]
    assert np.mean([a == b for a, b in zip(ids, again, strict=True)]) > 0.97
    assert one_by_one == ids[:50]
    assert 10 < len(set(ids)) < 200  # many regions, each holding many inputs
    flipped = marker.regions({NAME: x}, pairs[:, ::-1].copy())
    assert not set(ids) & set(flipped)  # the model's top two classes are part of the region


def test_selection_share_matches_the_fraction_and_another_key_partitions_differently() -> None:
    regions = [bytes([i % 256, i // 256]) * 16 for i in range(20000)]
    share = RegionMarker(KEY, 0.3, 4, 0.5).selected(regions).mean()
    assert abs(share - 0.3) < 0.02  # 6 standard deviations
    x = _activations(300, seed=2)
    pairs = top_two(torch.softmax(_logits(x), dim=1).numpy())
    other = RegionMarker(WatermarkKey(bytes(32)), 0.3, 4, 0.5)
    assert RegionMarker(KEY, 0.3, 4, 0.5).regions({NAME: x}, pairs) != other.regions(
        {NAME: x}, pairs
    )


def test_one_vote_per_region_by_plurality_with_ties_to_the_lower_class() -> None:
    regions = [b"a", b"a", b"a", b"b", b"b", b"c"]
    answers = np.array([2, 2, 5, 3, 1, 7])
    runner_up = np.array([2, 2, 2, 3, 3, 4])
    distinct, votes = region_votes(regions, answers, runner_up)
    assert distinct == [b"a", b"b", b"c"]
    assert votes.tolist() == [True, False, False]  # b: 1 and 3 tie, 1 wins


def test_region_test_is_fisher_over_regions_and_calibrated_under_the_null() -> None:
    result = region_test(np.array([1, 1, 1, 0, 0, 0], bool), np.array([1, 1, 1, 0, 0, 1], bool))
    assert result.trials == 3 and result.matches == 3
    assert abs(result.p_value - 0.2) < 1e-12  # C(4,3) / C(6,3)
    rng = np.random.default_rng(0)
    votes = rng.random(400) < 0.3  # any suspect's votes, fixed
    p = np.array([region_test(rng.random(400) < 0.3, votes).p_value for _ in range(4000)])
    assert (p < 0.01).mean() <= 0.01 + 3 * np.sqrt(0.01 * 0.99 / 4000)


def _records(folder: Path) -> list[tuple[str, str, int, int, int]]:
    return sorted(
        (r.key_id, r.query_id, r.label, r.answer, r.count)
        for r in read_triggers(folder, "clf", KEY)
    )


@pytest.mark.parametrize("policy", [TopKPolicy(k=3), LabelPolicy()])
def test_a_batch_restricted_together_answers_and_records_as_one_by_one(
    tmp_path: Path, policy: TopKPolicy | LabelPolicy
) -> None:
    """``restrict_many`` (one marking and policy pass over a batch's requests of the same k and
    shapes) gives each request what ``restrict`` gives it alone, trigger records included; a
    request of another k or shape is restricted on its own."""
    x = _activations(400, seed=5)
    logits = _logits(x)
    spans = [(0, 1), (1, 4), (4, 40), (40, 41), (41, 200), (200, 400)]
    ks = [0, 0, 2, 0, 0, 2]
    contexts = [QueryContext(f"r{i}", f"k{i % 3}") for i in range(len(spans))]
    answers: dict[str, list[dict[str, np.ndarray]]] = {}
    for mode in ("alone", "together"):
        config = _stage(policy, region_fraction=0.5).config
        stage = SimpleNamespace(
            config=config, watermark=ModelWatermark(config, KEY, tmp_path / mode)
        )
        outputs = [logits[a:b] for a, b in spans]
        inputs = [{NAME: x[a:b]} for a, b in spans]
        got: list[Any]
        if mode == "alone":
            got = [
                restrict(stage, out, arrays, k, context=context)  # type: ignore[arg-type]
                for out, arrays, k, context in zip(outputs, inputs, ks, contexts, strict=True)
            ]
        else:
            got = restrict_many(stage, outputs, inputs, ks, contexts)  # type: ignore[arg-type]
        stage.watermark.close()
        answers[mode] = [answer for answer in got if isinstance(answer, dict)]
        assert len(answers[mode]) == len(spans)
    for alone, together in zip(answers["alone"], answers["together"], strict=True):
        assert alone.keys() == together.keys()
        for name in alone:
            np.testing.assert_array_equal(together[name], alone[name])
    recorded = _records(tmp_path / "alone" / "clf")
    assert recorded and _records(tmp_path / "together" / "clf") == recorded
