"""Exact tests behind an ownership claim, one per watermark scheme.

Label watermark (DAWN-style). Every distinct eligible candidate query ``x`` (one the model is
unsure of; eligibility depends on the model alone) has a keyed selection bit ``s(x)`` and a
keyed watermark label ``w(x)`` (never the model's own label), independent parts of one HMAC.
The suspect *matches* ``x`` when its top-1 answer is ``w(x)``. If the suspect was made without
our watermarked answers, it is independent of the key, so given the matches the selected
queries are a uniformly random subset of the eligible candidates: the number of matches among
the selected queries is hypergeometric (Fisher's exact test, one-sided). The chance rate is the
suspect's match rate on the unselected eligible queries. A conservative binomial
bound (match probability at most ``1 / (classes - 1)`` for any independent model) is reported
too; it needs no control queries but far more triggers for the same confidence.

Region marks (the label watermark's default). The unit is the distinct keyed region, never the
candidate: candidates of one region are answered alike, so counting them as independent trials
would give false p-values. Among the candidates the model is unsure of, each distinct region
casts one vote: whether the suspect's most frequent answer over the region's candidates is the
model's runner-up. The regions' selection bits are independent keyed coins (one HMAC per
region, under a subkey of their own) and the votes depend only on the suspect, the candidates
and the partition, so for a suspect made without our answers the selected regions are a
uniformly random subset of the voting regions: the number of runner-up votes among them is
hypergeometric (Fisher's exact test, one-sided, at the region level).

Signal watermark. Every answer moved some probability from the model's class ``y(x)`` to a
keyed other class ``t(x)``, uniform over the ``classes - 1`` others. The suspect *matches* ``x``
when its best class other than ``y(x)`` is ``t(x)``. Independent of the key, that happens with
probability exactly ``1 / (classes - 1)`` for every query, independently across distinct
queries: the number of matches is Binomial(n, 1 / (classes - 1)).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import stats

DEFAULT_ALPHA = 2.0**-64


@dataclass(frozen=True)
class SchemeResult:
    """One scheme's exact test: trials, matches, rates, p-value and verdict."""

    scheme: str
    test: str
    candidates: int  # distinct candidate queries
    trials: int  # label: selected (trigger) queries; signal: compared queries
    matches: int
    match_rate: float
    chance_rate: float
    p_value: float
    alpha: float
    claimed: bool
    p_bound: float | None = None  # label: the conservative binomial bound
    note: str = ""


def label_test(
    selected: npt.NDArray[np.bool_],
    matches: npt.NDArray[np.bool_],
    classes: int,
    alpha: float = DEFAULT_ALPHA,
) -> SchemeResult:
    """Fisher's exact test: are matches over-represented among the selected queries?"""
    total, hits = len(selected), int(matches.sum())
    trials = int(selected.sum())
    k = int((selected & matches).sum())
    controls = total - trials
    chance = float(matches[~selected].mean()) if controls else float("nan")
    p = float(stats.hypergeom.sf(k - 1, total, hits, trials)) if trials else 1.0
    bound = (
        float(stats.binomtest(k, trials, 1.0 / (classes - 1), alternative="greater").pvalue)
        if trials
        else 1.0
    )
    return SchemeResult(
        scheme="label",
        test="Fisher exact (hypergeometric), one-sided",
        candidates=total,
        trials=trials,
        matches=k,
        match_rate=k / trials if trials else float("nan"),
        chance_rate=chance,
        p_value=p,
        alpha=alpha,
        claimed=p < alpha,
        p_bound=bound,
        note="" if trials else "no candidate query was selected for the label watermark",
    )


def region_votes(
    regions: list[bytes], answers: npt.NDArray[np.int64], runner_up: npt.NDArray[np.int64]
) -> tuple[list[bytes], npt.NDArray[np.bool_]]:
    """One vote per distinct region: is the suspect's most frequent answer over the region's
    candidates (ties: the lower class) the runner-up the region was marked with?"""
    counts: dict[bytes, dict[int, int]] = {}
    target: dict[bytes, int] = {}
    for region, answer, second in zip(regions, answers.tolist(), runner_up.tolist(), strict=True):
        tally = counts.setdefault(region, {})
        tally[answer] = tally.get(answer, 0) + 1
        target[region] = second
    distinct = list(counts)
    votes = [min(counts[r], key=lambda c: (-counts[r][c], c)) == target[r] for r in distinct]
    return distinct, np.array(votes, dtype=bool)


def region_test(
    selected: npt.NDArray[np.bool_], votes: npt.NDArray[np.bool_], alpha: float = DEFAULT_ALPHA
) -> SchemeResult:
    """Fisher's exact test over regions: are runner-up votes over-represented among the selected?"""
    total, hits, trials = len(votes), int(votes.sum()), int(selected.sum())
    k = int((selected & votes).sum())
    controls = total - trials
    p = float(stats.hypergeom.sf(k - 1, total, hits, trials)) if trials else 1.0
    return SchemeResult(
        scheme="label",
        test="Fisher exact over regions (one vote per region), one-sided",
        candidates=total,
        trials=trials,
        matches=k,
        match_rate=k / trials if trials else float("nan"),
        chance_rate=float(votes[~selected].mean()) if controls else float("nan"),
        p_value=p,
        alpha=alpha,
        claimed=p < alpha,
        note="" if trials else "no region the candidates fall in was selected",
    )


def signal_test(
    matches: npt.NDArray[np.bool_], classes: int, alpha: float = DEFAULT_ALPHA
) -> SchemeResult:
    """Exact binomial test: is the suspect's runner-up the keyed class more often than chance?"""
    trials, k = len(matches), int(matches.sum())
    chance = 1.0 / (classes - 1)
    p = float(stats.binomtest(k, trials, chance, alternative="greater").pvalue) if trials else 1.0
    return SchemeResult(
        scheme="signal",
        test="exact binomial, one-sided",
        candidates=trials,
        trials=trials,
        matches=k,
        match_rate=k / trials if trials else float("nan"),
        chance_rate=chance,
        p_value=p,
        alpha=alpha,
        claimed=p < alpha,
        note="" if trials else "the suspect ranked no class besides the model's own",
    )
