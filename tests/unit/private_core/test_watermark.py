"""Watermarking in the private tier: per-query decisions, answers, key storage, trigger log."""

from __future__ import annotations

import base64
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from scipy import stats

from private_core.policy import INDICES, SCORES, apply_policy, restrict
from private_core.watermark.engine import ModelWatermark, QueryContext
from private_core.watermark.keys import WatermarkKey, load_key, save_key
from private_core.watermark.marks import QueryMarker, watermark_labels
from private_core.watermark.triggers import (
    TriggerLog,
    TriggerLogError,
    TriggerRecord,
    read_trigger_union,
    read_triggers,
    trigger_folders,
)
from shared.crypto import DecryptionError
from shared.errors import Unavailable
from shared.keys import LocalFileKeyProvider
from shared.manifest import (
    LabelPolicy,
    ModelConfig,
    RoundingPolicy,
    TopKPolicy,
    WatermarkConfig,
)
from splitvault.ownership.stats import label_test, signal_test

KEY = WatermarkKey(bytes(range(32)))
CLASSES = 10
NAME = "act"


def _activations(n: int, seed: int = 0) -> np.ndarray:
    """ReLU-like FP16 activations, as the public tier sends them."""
    rng = np.random.default_rng(seed)
    return np.maximum(rng.normal(size=(n, 16, 4, 4)), 0).astype(np.float16)


def _logits(activations: np.ndarray) -> torch.Tensor:
    weights = np.random.default_rng(99).normal(size=(16 * 4 * 4, CLASSES))
    flat = activations.reshape(len(activations), -1).astype(np.float64)
    return torch.from_numpy(flat @ weights)


def _probabilities(logits: torch.Tensor) -> np.ndarray:
    return torch.softmax(logits.double(), dim=1).numpy()


def _config(policy: TopKPolicy | LabelPolicy, **watermark: object) -> ModelConfig:
    """Per-query (DAWN-style) marks unless ``marks`` says otherwise; region marks have their
    own tests (test_watermark_regions.py)."""
    watermark = {"marks": "query", **watermark}
    return ModelConfig(
        name="clf",
        split="features.1",
        task="classification",
        policy=policy,
        watermark=WatermarkConfig(enabled=True, **watermark),  # type: ignore[arg-type]
    )


def _stage(config: ModelConfig, trigger_dir: Path | None = None) -> SimpleNamespace:
    """What restrict() reads of a loaded back stage."""
    return SimpleNamespace(config=config, watermark=ModelWatermark(config, KEY, trigger_dir))


def _answer(stage: SimpleNamespace, activations: np.ndarray) -> dict[str, np.ndarray]:
    return restrict(stage, _logits(activations), {NAME: activations})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("policy", "scheme"),
    [(TopKPolicy(k=3), "label"), (LabelPolicy(), "label"), (TopKPolicy(k=3), "signal")],
)
def test_same_query_same_answer_alone_or_in_any_batch(
    policy: TopKPolicy | LabelPolicy, scheme: str
) -> None:
    stage = _stage(_config(policy, scheme=scheme, fraction=0.05, max_confidence=1.0))
    acts = _activations(400)
    whole = _answer(stage, acts)
    for row in (0, 17, 399):
        alone = _answer(stage, acts[row : row + 1])
        shuffled = _answer(stage, acts[[row, *range(50, 70)]])
        for key in whole:
            np.testing.assert_array_equal(alone[key][0], whole[key][row])
            np.testing.assert_array_equal(shuffled[key][0], whole[key][row])


def test_canonical_id_survives_fp16_rounding_noise_but_not_another_input() -> None:
    marker = QueryMarker(KEY, 0.005)
    acts = np.maximum(np.random.default_rng(4).normal(size=(1000, 16, 8, 8)), 0).astype(np.float16)
    noisy = acts.copy()
    bits = noisy.view(np.uint16)
    hot = acts.reshape(1000, -1).argmax(axis=1)  # one nonzero element per sample moves 1 ulp
    bits.reshape(1000, -1)[np.arange(1000), hot] += 1
    ids = marker.query_ids({NAME: acts})
    moved = [a != b for a, b in zip(ids, marker.query_ids({NAME: noisy}), strict=True)]
    assert sum(moved) <= 10  # batch-dependent rounding moves (almost) no query
    assert len(set(ids)) == len(ids)
    other = QueryMarker(WatermarkKey(bytes(32)), 0.005)
    assert not set(other.query_ids({NAME: acts})) & set(ids)


def test_selected_share_matches_the_fraction_within_binomial_bounds() -> None:
    n, fraction = 20_000, 0.05
    marks = QueryMarker(KEY, fraction).marks({NAME: _activations(n, seed=1)})
    low, high = stats.binom.ppf([1e-6, 1 - 1e-6], n, fraction)
    assert low <= marks.selected.sum() <= high
    labels = watermark_labels(np.zeros(n, np.int64), marks.offsets, CLASSES)
    counts = np.bincount(labels, minlength=CLASSES)
    assert counts[0] == 0  # never the model's own class, uniform over the others
    assert stats.chisquare(counts[1:]).pvalue > 1e-6


def test_label_watermark_answers_another_class_first_and_keeps_the_scores() -> None:
    config = _config(TopKPolicy(k=3, decimals=4), fraction=0.05, max_confidence=1.0)
    acts = _activations(2000)
    logits = _logits(acts)
    marking = ModelWatermark(config, KEY).marking({NAME: acts}, _probabilities(logits))
    marked = apply_policy(config, logits, 0, marking)
    plain = apply_policy(config, logits)
    chosen = marking.marks.selected
    assert 50 <= chosen.sum() <= 150
    np.testing.assert_array_equal(marked[INDICES][~chosen], plain[INDICES][~chosen])
    top1 = logits.argmax(dim=1).numpy()
    wanted = watermark_labels(top1, marking.marks.offsets, CLASSES)
    np.testing.assert_array_equal(marked[INDICES][chosen, 0], wanted[chosen])
    assert (marked[INDICES][chosen, 0] != top1[chosen]).all()
    assert all(len(set(row)) == 3 for row in marked[INDICES])
    np.testing.assert_array_equal(marked[SCORES], plain[SCORES])  # the model's sorted scores


def test_label_watermark_under_the_label_policy() -> None:
    config = _config(LabelPolicy(), fraction=0.05, max_confidence=1.0)
    acts = _activations(1000)
    logits = _logits(acts)
    marking = ModelWatermark(config, KEY).marking({NAME: acts}, _probabilities(logits))
    answered = apply_policy(config, logits, 0, marking)[INDICES][:, 0]
    top1 = logits.argmax(dim=1).numpy()
    np.testing.assert_array_equal(answered != top1, marking.marks.selected)


def test_label_watermark_selects_only_where_the_model_is_unsure() -> None:
    config = _config(LabelPolicy(), fraction=0.2, max_confidence=0.9)
    acts = _activations(4000, seed=6)
    logits = _logits(acts) / 2  # a spread of confidences
    probabilities = _probabilities(logits)
    marking = ModelWatermark(config, KEY).marking({NAME: acts}, probabilities)
    unsure = probabilities.max(axis=1) < 0.9
    assert 0.2 < unsure.mean() < 0.8
    assert not marking.marks.selected[~unsure].any()
    n = int(unsure.sum())
    low, high = stats.binom.ppf([1e-6, 1 - 1e-6], n, 0.2)
    assert low <= marking.marks.selected[unsure].sum() <= high


def test_signal_never_changes_the_top1_and_rounding_still_applies() -> None:
    config = _config(TopKPolicy(k=3, decimals=3), scheme="signal", amplitude=0.2)
    acts = _activations(3000, seed=2)
    logits = _logits(acts)
    logits[:100, 1] = logits[:100].max(dim=1).values  # exact ties with the top class
    logits[100:200, 2] = logits[100:200].max(dim=1).values - 1e-9  # near ties
    marking = ModelWatermark(config, KEY).marking({NAME: acts}, _probabilities(logits))
    marked = apply_policy(config, logits, 0, marking)
    plain = apply_policy(config, logits)
    np.testing.assert_array_equal(marked[INDICES][:, 0], plain[INDICES][:, 0])
    np.testing.assert_array_equal(marked[SCORES], np.round(marked[SCORES], 3))
    assert (np.diff(marked[SCORES], axis=1) <= 0).all()
    targets = watermark_labels(plain[INDICES][:, 0], marking.marks.signal_offsets, CLASSES)
    runner_up = marked[INDICES][:, 1] == targets
    assert runner_up[200:].mean() > 0.7  # the keyed class is second unless the margin is small
    assert (plain[INDICES][:, 1] == targets)[200:].mean() < 0.2


def test_watermark_config_must_fit_the_policy_and_task() -> None:
    with pytest.raises(ValidationError, match="signal watermark needs the topk policy"):
        _config(LabelPolicy(), scheme="signal")
    with pytest.raises(ValidationError, match="needs a classifier"):
        ModelConfig(
            name="emb",
            split="x",
            task="embedding",
            policy=RoundingPolicy(),
            watermark=WatermarkConfig(enabled=True),
        )
    with pytest.raises(ValidationError):
        WatermarkConfig(fraction=0.6)


def test_key_is_stored_encrypted_and_needs_the_kek(tmp_path: Path) -> None:
    provider = LocalFileKeyProvider.create(tmp_path / "kek")
    path = tmp_path / "watermark.key.enc"
    save_key(KEY, path, provider)
    data = path.read_bytes()
    for form in (KEY.secret, KEY.secret.hex().encode(), base64.b64encode(KEY.secret)):
        assert form not in data
    assert load_key(path, provider) == KEY
    with pytest.raises(DecryptionError, match="wrong key"):
        load_key(path, LocalFileKeyProvider.create(tmp_path / "other"))


def _record(i: int, key_id: str = "k_1") -> TriggerRecord:
    return TriggerRecord(
        time=float(i), model="clf", query_id=f"{i:064x}", label=1, answer=2, key_id=key_id
    )


def test_trigger_log_round_trip_and_retention(tmp_path: Path) -> None:
    log = TriggerLog(tmp_path, "clf", KEY, max_records=64, max_bytes=1 << 20)
    for i in range(200):
        log.append([_record(i)])
    kept = list(read_triggers(tmp_path, "clf", KEY))
    assert 60 <= len(kept) <= 64  # the oldest segments were dropped
    assert [r.time for r in kept] == sorted(r.time for r in kept)
    assert kept[-1] == _record(199)
    reopened = TriggerLog(tmp_path, "clf", KEY, max_records=64, max_bytes=1 << 20)
    reopened.append([_record(200)])
    assert list(read_triggers(tmp_path, "clf", KEY))[-1] == _record(200)
    for segment in tmp_path.rglob("*.svtl"):
        assert b"k_1" not in segment.read_bytes()  # sealed


def test_trigger_log_refuses_tampered_moved_or_foreign_records(tmp_path: Path) -> None:
    TriggerLog(tmp_path, "clf", KEY, 1000, 1 << 20).append([_record(i) for i in range(3)])
    with pytest.raises(TriggerLogError):
        list(read_triggers(tmp_path, "other-model", KEY))
    with pytest.raises(TriggerLogError):
        list(read_triggers(tmp_path, "clf", WatermarkKey(bytes(32))))
    segment = next(tmp_path.rglob("*.svtl"))
    data = bytearray(segment.read_bytes())
    data[40] ^= 1
    segment.write_bytes(bytes(data))
    with pytest.raises(TriggerLogError, match="record 0 failed authentication"):
        list(read_triggers(tmp_path, "clf", KEY))


def test_restrict_keeps_the_label_watermarked_queries(tmp_path: Path) -> None:
    stage = _stage(_config(TopKPolicy(k=3), fraction=0.2, max_confidence=0.999), tmp_path)
    acts = _activations(500)
    answer = restrict(
        stage,  # type: ignore[arg-type]
        _logits(acts),
        {NAME: acts},
        context=QueryContext(request_id="r-1", key_id="k_abc"),
    )
    marks = stage.watermark.marking({NAME: acts}, _probabilities(_logits(acts))).marks
    assert marks.selected.any()
    stage.watermark.close()  # written off the request path, then the writer stops
    records = list(read_triggers(tmp_path / "clf", "clf", KEY))
    rows = np.flatnonzero(marks.selected)
    assert [r.query_id for r in records] == [marks.ids[i].hex() for i in rows]
    assert all(r.key_id == "k_abc" and r.request_id == "r-1" for r in records)
    assert [r.answer for r in records] == answer[INDICES][rows, 0].tolist()
    np.testing.assert_array_equal(records[0].arrays()[NAME], acts[rows[0]])


def test_signal_watermark_keeps_no_trigger_records(tmp_path: Path) -> None:
    stage = _stage(_config(TopKPolicy(k=3), scheme="signal"), tmp_path)
    _answer(stage, _activations(500))
    assert not (tmp_path / "clf").exists()


def test_exact_tests_on_known_tables() -> None:
    selected = np.array([True, True] + [False] * 8)
    matches = np.array([True, True] + [False] * 8)
    result = label_test(selected, matches, CLASSES, alpha=0.05)
    assert result.p_value == pytest.approx(1 / 45)  # both matches among 2 of 10: 1 / C(10, 2)
    assert result.claimed and result.chance_rate == 0.0
    result = signal_test(np.array([True] * 3 + [False] * 6), CLASSES, alpha=0.05)
    assert result.p_value == pytest.approx(stats.binom.sf(2, 9, 1 / 9))
    assert result.chance_rate == pytest.approx(1 / 9)


def test_independent_answers_are_not_claimed() -> None:
    """A suspect that never saw the watermark: p-values are not small."""
    marker = QueryMarker(KEY, 0.05)
    acts = _activations(4000, seed=3)
    marks = marker.marks({NAME: acts})
    top1 = _logits(acts).argmax(dim=1).numpy()
    rng = np.random.default_rng(5)
    suspect = np.where(rng.random(len(top1)) < 0.9, top1, rng.integers(0, CLASSES, len(top1)))
    label = label_test(marks.selected, suspect == watermark_labels(top1, marks.offsets, 10), 10)
    runner_up = rng.integers(0, CLASSES - 1, len(top1))
    runner_up = np.where(runner_up >= top1, runner_up + 1, runner_up)
    signal = signal_test(runner_up == watermark_labels(top1, marks.signal_offsets, 10), 10)
    assert label.p_value > 1e-3 and signal.p_value > 1e-3
    assert not label.claimed and not signal.claimed


def test_a_trigger_log_that_cannot_be_written_refuses_the_answer(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the log's folder should be")
    log = TriggerLog(blocker / "clf", "clf", KEY, 1000, 1 << 20)
    with pytest.raises(Unavailable, match="cannot keep its watermark evidence"):
        log.append([_record(1)])
    log.append([])  # nothing to keep: nothing refused


def test_replicas_logs_are_read_as_a_union(tmp_path: Path) -> None:
    TriggerLog(tmp_path / "triggers" / "clf", "clf", KEY, 1000, 1 << 20).append([_record(1)])
    for pod, first in (("splitvault-private-0", 10), ("splitvault-private-1", 20)):
        log = TriggerLog(tmp_path / pod / "triggers" / "clf", "clf", KEY, 1000, 1 << 20)
        log.append([_record(first), _record(first + 1)])
    (tmp_path / "empty-pod").mkdir()
    folders = trigger_folders(tmp_path, "clf")
    assert folders[0] == tmp_path / "triggers" / "clf" and len(folders) == 3
    times = sorted(r.time for r in read_trigger_union(folders, "clf", KEY))
    assert times == [1.0, 10.0, 11.0, 20.0, 21.0]
    assert trigger_folders(tmp_path / "missing", "clf") == []
