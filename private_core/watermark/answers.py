"""How a watermark changes an answer: a keyed other label, or probability moved to a keyed class."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

# The signal never moves more than this share of the gap between the top two probabilities,
# so the top-1 class stays strictly first (the class that gains was at most second).
_MAX_GAP_SHARE = 0.45


def shift_to_class(
    probabilities: npt.NDArray[np.float64], targets: npt.NDArray[np.int64], amplitude: float
) -> npt.NDArray[np.float64]:
    """Move ``amplitude`` of probability (capped) from each row's top class to ``targets``.

    ``targets`` never name the top class. Rows still sum to 1 and the top class stays first.
    """
    out = probabilities.copy()
    if out.shape[-1] < 2 or len(out) == 0:
        return out
    rows = np.arange(len(out))
    top = out.argmax(axis=1)
    ordered = np.sort(out, axis=1)
    delta = np.minimum(amplitude, _MAX_GAP_SHARE * (ordered[:, -1] - ordered[:, -2]))
    out[rows, top] -= delta
    out[rows, targets] += delta
    return out


def relabel_top_k(
    indices: npt.NDArray[np.int64],
    scores: npt.NDArray[np.float64],
    probabilities: npt.NDArray[np.float64],
    selected: npt.NDArray[np.bool_],
    labels: npt.NDArray[np.int64],
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    """For selected rows: the watermark label first, then the other classes in the model's
    order; scores stay the model's sorted top-k values, so the answer looks like any other.

    Every row is computed whether selected or not (then kept or not), so a marked answer costs
    exactly the time of an unmarked one.
    """
    rows, k = indices.shape
    if rows == 0:
        return indices.copy(), scores.copy()
    order = np.argsort(-probabilities, axis=1, kind="stable")
    others = order[order != labels[:, None]].reshape(rows, -1)
    relabelled = np.concatenate((labels[:, None], others), axis=1)[:, :k]
    sorted_scores = np.take_along_axis(probabilities, order, axis=1)[:, :k]
    chosen = selected[:, None]
    return np.where(chosen, relabelled, indices), np.where(chosen, sorted_scores, scores)
