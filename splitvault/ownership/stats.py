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
