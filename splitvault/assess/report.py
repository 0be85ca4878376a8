"""Plain-text tables and verdicts of an assessment."""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from splitvault.assess.experiment import Settings, SplitAssessment, recommend

NONE_PASSES = "no candidate passes"


def header(model: str, task: str, rows: int, heldout: int, settings: Settings) -> str:
    """What was measured, on how much data."""
    answers = "label-only" if task == "classification" else "embedding"
    return (
        f"assess {model!r} ({task}; {answers} thieves; {rows:,} natural inputs, "
        f"{heldout:,} held out for fidelity; {settings.seeds} seeds; "
        f"{settings.training.steps} Adam steps per thief)"
    )


def split_table(assessment: SplitAssessment) -> list[str]:
    """The cost line, both curves with the gap and its upper bound, and the verdict."""
    if assessment.error is not None or assessment.cost is None:
        return [f"split after {assessment.split!r}: not assessed: {assessment.error}"]
    cost = assessment.cost
    lines = [
        f"split after {assessment.split!r}: private tier holds "
        f"{cost.private_parameter_share:.1%} of parameters ({cost.back_parameters:,} of "
        f"{cost.back_parameters + cost.front_parameters:,}) and "
        f"{cost.private_flop_share:.1%} of FLOPs ({_flops(cost.back_flops)} of "
        f"{_flops(cost.back_flops + cost.front_flops)} per sample)",
        "  budget | front-known fidelity | black-box fidelity | gap (points) | gap upper 95%",
    ]
    for result in assessment.results:
        lines.append(
            f"  {result.budget:>6} | {_spread(result.front_known):>20} | "
            f"{_spread(result.black_box):>18} | {100 * result.gap_mean:>+12.1f} | "
            f"{100 * result.gap_upper:>+13.1f}"
        )
    lines.append(verdict(assessment))
    return lines


def verdict(assessment: SplitAssessment) -> str:
    """PASS or FAIL, in words."""
    seeds = len(assessment.results[0].front_known) if assessment.results else 0
    bound = f"upper 95% bound, one-sided Student t over {seeds} seeds"
    points = f"{100 * assessment.margin:g} points"
    if assessment.passes:
        return (
            f"verdict: PASS: at every budget a thief holding the front copies the model at most "
            f"{points} better than a black-box thief ({bound})"
        )
    budgets = ", ".join(str(b) for b in assessment.failing_budgets)
    return (
        f"verdict: FAIL: a thief holding the front copies the model more than {points} better "
        f"than a black-box thief at budget(s) {budgets} ({bound})"
    )


def recommendation(assessments: Sequence[SplitAssessment]) -> str:
    """The cheapest passing candidate, or a plain statement that none passes."""
    best = recommend(assessments)
    if best is None or best.cost is None:
        return (
            f"recommendation: none: {NONE_PASSES}. At every split tried a thief who owns the "
            "public host copies the model measurably better than one who only queries it; "
            "keep more of the model private (an earlier split) or accept that risk knowingly."
        )
    return (
        f"recommendation: split after {best.split!r}, the cheapest candidate that passes "
        f"({best.cost.private_flop_share:.1%} of FLOPs and "
        f"{best.cost.private_parameter_share:.1%} of parameters private)"
    )


def one_line(assessment: SplitAssessment) -> str:
    """The summary ``pack`` prints: verdict, worst bound and the private share."""
    if assessment.error is not None or assessment.cost is None or not assessment.results:
        return f"assess: split after {assessment.split!r} not assessed: {assessment.error}"
    worst = max(assessment.results, key=lambda r: r.gap_upper)
    budgets = "/".join(str(r.budget) for r in assessment.results)
    return (
        f"assess: {'PASS' if assessment.passes else 'FAIL'}: holding the front gains a thief at "
        f"most {100 * worst.gap_upper:+.1f} points of fidelity over a black-box thief (upper 95% "
        f"bound, budgets {budgets}, {len(worst.gaps)} seeds); private tier holds "
        f"{assessment.cost.private_parameter_share:.1%} of parameters, "
        f"{assessment.cost.private_flop_share:.1%} of FLOPs"
    )


def _spread(values: list[float]) -> str:
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"


def _flops(count: int) -> str:
    for unit, size in (("GFLOP", 1e9), ("MFLOP", 1e6), ("kFLOP", 1e3)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count} FLOP"
