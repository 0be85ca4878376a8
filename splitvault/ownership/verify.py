"""``verify-ownership``: is a suspect model a copy trained on our watermarked answers?

The candidate inputs must be fixed before the suspect is queried (for instance the queries an
API key sent, obtained in discovery, or a pool the owner holds); they are reduced to distinct
canonical queries, each scheme's exact test is run (``splitvault.ownership.stats``), and the
selected candidates are looked up in the private tier's trigger log, which says when and to
which API key each one was answered with a watermark label.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from private_core.watermark.engine import resolve_scheme
from private_core.watermark.marks import watermark_labels
from private_core.watermark.triggers import TriggerLogError
from splitvault.ownership.owner import Arrays, Candidates, OwnerModel, RegionCandidates
from splitvault.ownership.stats import (
    DEFAULT_ALPHA,
    SchemeResult,
    label_test,
    region_test,
    region_votes,
    signal_test,
)
from splitvault.ownership.suspect import Suspect

SchemeChoice = Literal["auto", "label", "signal", "all"]


@dataclass(frozen=True)
class TriggerCheck:
    """How many selected candidates the private tier's trigger log holds, and for which keys."""

    selected: int
    found: int
    by_key: dict[str, int] = field(default_factory=dict)
    problem: str | None = None


@dataclass(frozen=True)
class Verification:
    """Every scheme's result against one suspect, and the overall verdict."""

    model: str
    suspect: str
    received: int
    candidates: int
    alpha: float
    results: list[SchemeResult]
    triggers: TriggerCheck
    key_draws: int = 1  # keys drawn at pack to find this one (``watermark.choice.json``)

    @property
    def threshold(self) -> float:
        """``alpha`` shared among the schemes tested and the keys drawn at pack (Bonferroni:
        the key kept was chosen among ``key_draws`` by benign cost, so each draw is a test)."""
        return self.alpha / (max(1, len(self.results)) * max(1, self.key_draws))

    @property
    def claimed(self) -> bool:
        """Whether any scheme's p-value is below the shared threshold."""
        return any(result.p_value < self.threshold for result in self.results)

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable summary (non-finite numbers become None)."""
        data = asdict(self)
        data["threshold"], data["claimed"] = self.threshold, self.claimed
        cleaned: dict[str, Any] = _finite(data)
        return cleaned

    def text(self) -> str:
        """The human-readable report."""
        lines = [
            f"ownership verification: model {self.model!r} against {self.suspect}",
            f"candidates: {self.candidates:,} distinct queries ({self.received:,} given)",
            f"{'scheme':<7} {'pool':>7} {'trials':>7} {'matches':>8} {'match rate':>11} "
            f"{'chance':>8} {'p-value':>10}  test",
        ]
        for r in self.results:
            lines.append(
                f"{r.scheme:<7} {r.candidates:>7,} {r.trials:>7,} {r.matches:>8,} "
                f"{_pct(r.match_rate):>11} {_pct(r.chance_rate):>8} {r.p_value:>10.3g}  {r.test}"
                + (f" (conservative bound p <= {r.p_bound:.3g})" if r.p_bound is not None else "")
                + (f" [{r.note}]" if r.note else "")
            )
        t = self.triggers
        log_line = f"trigger log: {t.found} of {t.selected} selected candidates were served a watermark label"
        if t.by_key:
            log_line += " (" + ", ".join(f"key {k or '-'}: {n}" for k, n in t.by_key.items()) + ")"
        lines.append(log_line if t.problem is None else f"trigger log FAILED: {t.problem}")
        verdict = "CLAIMED" if self.claimed else "not claimed"
        lines.append(
            f"verdict: {verdict} (threshold p < {self.threshold:.3g}: alpha {self.alpha:.3g} "
            f"over {len(self.results)} scheme(s) and {self.key_draws} key draw(s) at pack)"
        )
        return "\n".join(lines)


def verify_ownership(
    owner: OwnerModel,
    suspect: Suspect,
    inputs: Arrays,
    *,
    schemes: SchemeChoice = "auto",
    alpha: float = DEFAULT_ALPHA,
    fraction: float | None = None,
    max_confidence: float | None = None,
) -> Verification:
    """Query ``suspect`` with the distinct candidates and run each scheme's exact test.

    ``fraction`` and ``max_confidence`` override the model's label watermark settings (use
    those in force when the candidates were answered).
    """
    candidates = owner.candidates(inputs, owner.marker(fraction), max_confidence)
    return verify_candidates(owner, candidates, suspect, schemes=schemes, alpha=alpha)


def verify_candidates(
    owner: OwnerModel,
    candidates: Candidates,
    suspect: Suspect,
    *,
    schemes: SchemeChoice = "auto",
    alpha: float = DEFAULT_ALPHA,
    triggers: TriggerCheck | None = None,
) -> Verification:
    """``verify_ownership`` for candidates already derived (to test many suspects on one set)."""
    if not 0.0 < alpha < 1.0:
        raise ValueError("alpha must be in (0, 1)")
    ranking = suspect.rank(candidates.inputs)
    results = [
        _test(scheme, candidates, ranking, owner.classes, alpha)
        for scheme in _schemes(owner, schemes)
    ]
    return Verification(
        model=owner.name,
        suspect=suspect.description,
        received=candidates.received,
        candidates=len(candidates.labels),
        alpha=alpha,
        results=results,
        triggers=triggers if triggers is not None else check_triggers(owner, candidates),
        key_draws=owner.key_draws,
    )


def _schemes(owner: OwnerModel, choice: SchemeChoice) -> list[str]:
    if choice == "all":
        return ["label", "signal"]
    if choice != "auto":
        return [choice]
    settings = owner.config.watermark
    if settings is None or not settings.enabled:
        return ["label", "signal"]
    return [resolve_scheme(settings)]


def _test(
    scheme: str,
    candidates: Candidates,
    ranking: npt.NDArray[np.int64],
    classes: int,
    alpha: float,
) -> SchemeResult:
    y, marks = candidates.labels, candidates.marks
    if scheme == "label" and candidates.regions is not None:
        return _region_test(candidates.regions, ranking, alpha)
    if scheme == "label":  # among the queries the watermark could have selected
        wanted = watermark_labels(y, marks.offsets, classes)
        matches = ranking[:, 0] == wanted
        mask = candidates.eligible
        return label_test(marks.selected[mask], matches[mask], classes, alpha)
    wanted = watermark_labels(y, marks.signal_offsets, classes)
    runner_up = np.array([_first_other(row, label) for row, label in zip(ranking, y, strict=True)])
    ranked = runner_up >= 0
    return signal_test(runner_up[ranked] == wanted[ranked], classes, alpha)


def _region_test(
    regions: RegionCandidates, ranking: npt.NDArray[np.int64], alpha: float
) -> SchemeResult:
    """One vote per distinct region among the unsure candidates (``stats.region_test``)."""
    answers = ranking[regions.rows, 0]
    distinct, votes = region_votes(regions.ids, answers, regions.runner_up)
    chosen = dict(zip(regions.ids, regions.selected.tolist(), strict=True))
    selected = np.array([chosen[r] for r in distinct], dtype=bool)
    return region_test(selected, votes, alpha)


def _first_other(row: npt.NDArray[np.int64], label: int) -> int:
    """The suspect's best class that is not the model's own (-1 if it ranked no other)."""
    others = row[row != label]
    return int(others[0]) if others.size else -1


def check_triggers(owner: OwnerModel, candidates: Candidates) -> TriggerCheck:
    """Look the selected candidates up in the private tier's trigger log."""
    selected = {
        qid.hex()
        for qid, chosen in zip(candidates.marks.ids, candidates.marks.selected, strict=True)
        if chosen
    }
    by_key: Counter[str] = Counter()
    found: set[str] = set()
    try:
        for record in owner.triggers():
            if record.query_id in selected and record.query_id not in found:
                found.add(record.query_id)
                by_key[record.key_id] += 1
    except (TriggerLogError, OSError) as error:
        return TriggerCheck(len(selected), len(found), dict(by_key), str(error))
    return TriggerCheck(len(selected), len(found), dict(by_key))


def _pct(value: float) -> str:
    return "-" if math.isnan(value) else f"{100 * value:.2f}%"


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value
