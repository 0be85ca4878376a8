"""The serving comparison's targets: medians of per-round ratios with their spread, the split
compute difference, and phase percentiles from histogram buckets."""

from __future__ import annotations

import math

import pytest

from bench.phase_breakdown import quantile
from bench.serving_report import Point, Report, TargetResult, TargetRule, round_values


def _point(system: str, c: int, rps: float, p50: float) -> Point:
    return Point(system, "minilm", c, 1, rps, p50, p50 * 2, {}, 1.0, 1.0)


def _report() -> Report:
    rounds = {
        ("splitvault", "minilm", 1): [_point("splitvault", 1, 20, p) for p in (30, 40, 90)],
        ("fastapi", "minilm", 1): [_point("fastapi", 1, 30, p) for p in (30, 20, 30)],
    }
    return Report(
        conditions=[],
        systems={"splitvault": ("splitvault", ""), "fastapi": ("fastapi", "")},
        points=[rounds[key][0] for key in rounds],
        raw={},
        fidelity=[],
        command="",
        rounds=rounds,
        split_ms={"minilm": [28.0, 28.0, 28.0]},
    )


def test_a_target_is_the_median_of_per_round_ratios_with_their_spread() -> None:
    rule = TargetRule(1, "p50", "fastapi", 1.25, True, ("minilm",))
    values = round_values(_report(), "splitvault", rule, "minilm")
    assert values == (1.0, 2.0, 3.0)  # each round against the same round, not medians
    result = TargetResult(rule, "minilm", "splitvault", values)
    assert result.ratio == 2.0
    assert result.spread() == "1.00x - 3.00x"
    assert result.verdict() == "missed: 60% over"


def test_the_split_target_is_a_difference_in_ms() -> None:
    rule = TargetRule(1, "p50", "split", 3.0, True, ("minilm",))
    result = TargetResult(
        rule, "minilm", "splitvault", round_values(_report(), "splitvault", rule, "minilm")
    )
    assert result.values == (2.0, 12.0, 62.0)
    assert result.verdict() == "missed: 9.0 ms over"
    assert "split compute <= 3 ms" in rule.describe()


def test_the_split_target_sets_each_round_against_its_own_split_compute() -> None:
    """Measured in every round, the in-process compute is subtracted round by round: one slow
    one-off measurement cannot decide the verdict."""
    rule = TargetRule(1, "p50", "split", 3.0, True, ("minilm",))
    report = _report()
    report.split_ms = {"minilm": [28.0, 38.5, 20.0]}
    values = round_values(report, "splitvault", rule, "minilm")
    assert values == (2.0, 1.5, 70.0)
    result = TargetResult(rule, "minilm", "splitvault", values)
    assert result.ratio == 2.0 and result.verdict() == "met"
    report.split_ms = {"minilm": [28.0, 38.5]}  # rounds and split compute do not pair up
    assert round_values(report, "splitvault", rule, "minilm") == ()


def test_phase_percentiles_interpolate_within_buckets() -> None:
    buckets = {0.01: 0.0, 0.1: 50.0, 1.0: 100.0, math.inf: 100.0}
    assert quantile(buckets, 0.5) == pytest.approx(0.1)
    assert quantile(buckets, 0.99) == pytest.approx(0.1 + 0.98 * 0.9)
    assert math.isnan(quantile({0.1: 0.0, math.inf: 0.0}, 0.5))
