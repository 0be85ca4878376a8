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
    order; scores stay the model's sorted top-k values, so the answer looks like any other."""
    indices, scores = indices.copy(), scores.copy()
    k = indices.shape[1]
    for row in np.flatnonzero(selected):
        order = np.argsort(-probabilities[row], kind="stable")
        label = labels[row]
        indices[row] = np.concatenate(([label], order[order != label]))[:k]
        scores[row] = probabilities[row][order][:k]
    return indices, scores
