"""``splitvault assess`` logic: the gap's upper bound, the verdict, the recommendation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from splitvault.assess.experiment import (
    BudgetResult,
    Settings,
    SplitAssessment,
    partition,
    recommend,
    upper_bound,
)
from splitvault.assess.report import NONE_PASSES, recommendation, verdict
from splitvault.assess.stages import Cost, fresh_copy

T_95_DF2 = 2.919985580  # one-sided 95 % Student t quantile with 2 degrees of freedom


def budget(size: int, gaps: list[float]) -> BudgetResult:
    """A budget whose black-box thief scored 0.5 and whose front-known thief scored 0.5 + gap."""
    return BudgetResult(size, [0.5 + g for g in gaps], [0.5] * len(gaps))


def assessed(
    split: str, gaps: list[float], *, private_flops: int, front_parameters: int = 100
) -> SplitAssessment:
    cost = Cost(front_parameters, 1000, 1000 - private_flops, private_flops)
    return SplitAssessment(split, cost, [budget(50, gaps), budget(200, gaps)])


def test_upper_bound_is_one_sided_student_t() -> None:
    values = [0.1, 0.2, 0.3]
    expected = 0.2 + T_95_DF2 * 0.1 / math.sqrt(3)
    assert upper_bound(values) == pytest.approx(expected, abs=1e-9)
    assert upper_bound([0.04, 0.04, 0.04]) == pytest.approx(0.04)
    with pytest.raises(ValueError, match="two values"):
        upper_bound([0.1])


def test_a_split_passes_only_when_every_budget_is_within_the_margin() -> None:
    noisy_at_200 = SplitAssessment(
        "layer", Cost(10, 10, 10, 10), [budget(50, [0.0, 0.01, 0.02]), budget(200, [0.0, 0.1, 0.0])]
    )
    assert noisy_at_200.results[1].gap_mean < 0.05  # the mean alone would pass
    assert not noisy_at_200.passes
    assert noisy_at_200.failing_budgets == [200]
    assert verdict(noisy_at_200).startswith("verdict: FAIL")
    assert "budget(s) 200 " in verdict(noisy_at_200)
    tight = SplitAssessment("layer", Cost(10, 10, 10, 10), [budget(50, [0.01, 0.02, 0.03])])
    assert tight.passes
    assert verdict(tight).startswith("verdict: PASS")


def test_recommends_the_cheapest_passing_split() -> None:
    candidates = [
        assessed("early", [0.0, 0.01, 0.0], private_flops=900),
        assessed("middle", [0.01, 0.0, 0.02], private_flops=400),
        assessed("late", [0.3, 0.35, 0.4], private_flops=100),  # cheapest, but leaks
        SplitAssessment("head", error="submodule 'head' computes the model's output"),
    ]
    assert recommend(candidates) is candidates[1]
    assert recommendation(candidates).startswith("recommendation: split after 'middle'")


def test_never_recommends_an_empty_front() -> None:
    empty = assessed("input", [0.0, 0.0, 0.0], private_flops=1000, front_parameters=0)
    assert empty.passes and empty.empty_front
    assert recommend([empty]) is None
    assert NONE_PASSES in recommendation([empty])


def test_says_plainly_when_none_passes() -> None:
    leaky = [assessed(s, [0.2, 0.3, 0.25], private_flops=500) for s in ("a", "b")]
    assert recommend(leaky) is None
    assert recommendation(leaky).startswith("recommendation: none: no candidate passes")


def test_settings_need_two_seeds_and_positive_budgets() -> None:
    with pytest.raises(ValueError, match="at least 2 seeds"):
        Settings(seeds=1)
    with pytest.raises(ValueError, match="positive"):
        Settings(budgets=[0, 50])


def test_partition_holds_out_and_refuses_a_budget_beyond_the_pool() -> None:
    pool, heldout = partition(400, Settings(budgets=[50, 300]))
    assert len(heldout) == 100 and len(pool) == 300
    assert not set(pool.tolist()) & set(heldout.tolist())
    with pytest.raises(ValueError, match="budget 301 exceeds the 300 inputs"):
        partition(400, Settings(budgets=[301]))


def test_fresh_copy_draws_new_weights_and_leaves_the_source() -> None:
    norm = nn.LayerNorm(4)
    source = nn.Sequential(nn.Linear(8, 4), norm)
    with torch.no_grad():
        norm.weight.fill_(3.0)
    before = {n: p.clone() for n, p in source.named_parameters()}
    copy = fresh_copy(source, torch.Generator().manual_seed(0))
    for name, param in source.named_parameters():
        assert torch.equal(param, before[name])
    fresh = dict(copy.named_parameters())
    assert not torch.equal(fresh["0.weight"], before["0.weight"])
    assert fresh["0.weight"].abs().max() <= 1 / math.sqrt(8)
    assert torch.equal(fresh["1.weight"], torch.ones(4))
    assert torch.equal(fresh["1.bias"], torch.zeros(4))
