"""Budgets x seeds of both thieves on one split, the paired gap's upper bound, and the verdict.

For each seed the two thieves query the same inputs; the gap is front-known minus black-box
fidelity, paired by seed. Its upper 95 % bound is one-sided Student t over the seeds:
``mean + t(0.95, n - 1) * sd / sqrt(n)``. A split passes when that bound is at most
``margin`` (5 points) at every budget.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.stats import t as student_t

from splitvault.assess.stages import Cost, Stages, Tensors, cost
from splitvault.assess.thieves import Training, Victim, black_box, fidelity, front_known

DEFAULT_BUDGETS = (50, 200, 1000)
Progress = Callable[[], None]


@dataclass(frozen=True)
class Settings:
    """Budgets, seeds, the allowed gap and how much data is held out for fidelity."""

    budgets: Sequence[int] = DEFAULT_BUDGETS
    seeds: int = 5
    margin: float = 0.05
    heldout_fraction: float = 0.25
    max_heldout: int = 1000
    max_inputs: int | None = None  # a seeded subset of the data, to bound the time
    training: Training = field(default_factory=Training)

    def __post_init__(self) -> None:
        if self.seeds < 2:
            raise ValueError("an upper bound over seeds needs at least 2 seeds (5 or more advised)")
        if not self.budgets or min(self.budgets) < 1:
            raise ValueError("budgets must be positive query counts")

    @property
    def runs_per_split(self) -> int:
        return len(self.budgets) * self.seeds


@dataclass(frozen=True)
class BudgetResult:
    """Both thieves' fidelity at one budget, one value per seed."""

    budget: int
    front_known: list[float]
    black_box: list[float]

    @property
    def gaps(self) -> list[float]:
        return [f - b for f, b in zip(self.front_known, self.black_box, strict=True)]

    @property
    def gap_mean(self) -> float:
        return statistics.fmean(self.gaps)

    @property
    def gap_upper(self) -> float:
        """One-sided upper 95 % bound of the mean gap (Student t over the seeds)."""
        return upper_bound(self.gaps)


def upper_bound(values: Sequence[float], confidence: float = 0.95) -> float:
    """``mean + t(confidence, n - 1) * sd / sqrt(n)`` of ``values`` (n >= 2)."""
    if len(values) < 2:
        raise ValueError("an upper bound needs at least two values")
    spread = statistics.stdev(values) / math.sqrt(len(values))
    return statistics.fmean(values) + float(student_t.ppf(confidence, len(values) - 1)) * spread


@dataclass(frozen=True)
class SplitAssessment:
    """One split point: its cost, the curves, or why it could not be assessed."""

    split: str
    cost: Cost | None = None
    results: list[BudgetResult] = field(default_factory=list)
    margin: float = 0.05
    error: str | None = None

    @property
    def passes(self) -> bool:
        """Assessed, and the gap's upper bound is within the margin at every budget."""
        return self.error is None and all(r.gap_upper <= self.margin for r in self.results)

    @property
    def failing_budgets(self) -> list[int]:
        return [r.budget for r in self.results if r.gap_upper > self.margin]

    @property
    def empty_front(self) -> bool:
        """The front holds no parameters: the split would only serve the whole model privately."""
        return self.cost is not None and self.cost.front_parameters == 0


def partition(count: int, settings: Settings) -> tuple[torch.Tensor, torch.Tensor]:
    """Query pool and held-out rows, fixed for every seed (seed 0 shuffle)."""
    order = torch.from_numpy(np.random.default_rng(0).permutation(count))
    heldout = min(settings.max_heldout, max(1, int(count * settings.heldout_fraction)))
    pool = order[heldout:]
    if max(settings.budgets) > len(pool):
        raise ValueError(
            f"budget {max(settings.budgets)} exceeds the {len(pool)} inputs left for queries "
            f"after holding out {heldout} of {count}; give more data or smaller budgets"
        )
    return pool, order[:heldout]


def subset(inputs: Tensors, settings: Settings) -> Tensors:
    """At most ``settings.max_inputs`` rows, drawn once (seed 0)."""
    count = len(next(iter(inputs.values())))
    if settings.max_inputs is None or settings.max_inputs >= count:
        return inputs
    keep = torch.from_numpy(
        np.sort(np.random.default_rng(0).choice(count, settings.max_inputs, replace=False))
    )
    return {name: tensor[keep] for name, tensor in inputs.items()}


def make_victim(stages: Stages, inputs: Tensors, public_init: Stages | None = None) -> Victim:
    """The model's outputs and front activations on every input, computed once."""
    return Victim(stages, inputs, stages.outputs(inputs), stages.activations(inputs), public_init)


def assess_split(
    victim: Victim,
    settings: Settings,
    progress: Progress | None = None,
    baseline: dict[tuple[int, int], float] | None = None,
) -> SplitAssessment:
    """Train both thieves for every budget and seed; fidelity on the held-out rows.

    The black-box thief does not depend on the split: pass one ``baseline`` dict to every
    candidate's call and it is trained once per (budget, seed), the same for all.
    """
    pool, heldout = partition(len(victim.outputs), settings)
    cache = baseline if baseline is not None else {}
    results = []
    for budget in settings.budgets:
        known, blind = [], []
        for seed in range(settings.seeds):
            chosen = np.random.default_rng([seed, budget]).choice(len(pool), budget, replace=False)
            rows = pool[torch.from_numpy(chosen)]
            thief = front_known(victim, rows, settings.training, seed)
            known.append(fidelity(thief, victim, heldout))
            if (budget, seed) not in cache:
                thief = black_box(victim, rows, settings.training, seed)
                cache[budget, seed] = fidelity(thief, victim, heldout)
            blind.append(cache[budget, seed])
            if progress is not None:
                progress()
        results.append(BudgetResult(budget, known, blind))
    return SplitAssessment(
        split=victim.stages.split,
        cost=cost(victim.stages, victim.inputs),
        results=results,
        margin=settings.margin,
    )


def recommend(assessments: Sequence[SplitAssessment]) -> SplitAssessment | None:
    """The cheapest passing split: the least private compute (then parameters), front not empty."""
    passing = [a for a in assessments if a.passes and not a.empty_front and a.cost is not None]
    if not passing:
        return None
    return min(
        passing,
        key=lambda a: (a.cost.private_flop_share, a.cost.private_parameter_share) if a.cost else (),
    )
