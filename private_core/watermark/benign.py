"""A watermark key's benign cost on the owner's labelled data, and a key drawn to bound it.

The cost of a key is the top-1 accuracy its marks take away on labelled data: the share of
samples the model answers correctly that the watermarked answer gets wrong, less the reverse.
The answer is computed as the private tier computes it (``ModelWatermark.marking``, then
``apply_policy``), so the cost measured here is the cost served. ``choose_key`` draws keys until
one costs at most ``bound`` and stops after ``max_draws``; choosing the best of ``k`` keys can
inflate a verifier's false-claim rate by at most a factor ``k`` (README, watermark section).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from private_core.policy import INDICES, apply_policy
from private_core.watermark.engine import ModelWatermark
from private_core.watermark.keys import WatermarkKey
from shared.logs import get_logger
from shared.manifest import ModelConfig

log = get_logger(__name__)

BOUND = 0.0025  # a margin below issue 14's 0.5 % (README: what it buys on held-out data)
MAX_DRAWS = 16  # at most 4 bits of a claim's evidence (see module docstring)


@dataclass(frozen=True)
class BenignChunk:
    """Labelled samples as the private tier receives them: back-stage inputs (one row per
    sample), the back stage's raw output and the true class of each."""

    inputs: Mapping[str, Any]
    output: torch.Tensor
    labels: npt.NDArray[np.int64]


@dataclass(frozen=True)
class KeyChoice:
    """The key chosen, its cost, and the cost of every key drawn (in order)."""

    key: WatermarkKey
    cost: float
    costs: tuple[float, ...]

    @property
    def draws(self) -> int:
        """How many keys were drawn: the factor a claim's p-value may be inflated by."""
        return len(self.costs)


def benign_cost(config: ModelConfig, key: WatermarkKey, data: Sequence[BenignChunk]) -> float:
    """Top-1 accuracy lost to ``key``'s marks on ``data`` (negative: the marks helped)."""
    watermark = ModelWatermark(config, key)
    lost, total = 0, 0
    for chunk in data:
        probabilities = torch.softmax(chunk.output.to(torch.float64), dim=-1).numpy()
        own = probabilities.argmax(axis=1)
        marking = watermark.marking(chunk.inputs, probabilities)
        answered = np.asarray(apply_policy(config, chunk.output, 0, marking)[INDICES])[:, 0]
        lost += int((own == chunk.labels).sum()) - int((answered == chunk.labels).sum())
        total += len(chunk.labels)
    return lost / total if total else 0.0


def choose_key(
    config: ModelConfig,
    data: Sequence[BenignChunk],
    *,
    bound: float = BOUND,
    max_draws: int = MAX_DRAWS,
    generate: Callable[[], WatermarkKey] = WatermarkKey.generate,
) -> KeyChoice:
    """The first drawn key whose benign cost on ``data`` is at most ``bound``; after
    ``max_draws`` keys over it, the cheapest (logged as a warning)."""
    if max_draws < 1:
        raise ValueError("choose_key needs max_draws >= 1")
    drawn: list[tuple[float, WatermarkKey]] = []
    for draw in range(1, max_draws + 1):
        key = generate()
        cost = benign_cost(config, key, data)
        drawn.append((cost, key))
        log.info(
            "watermark_key_drawn",
            model=config.name,
            draw=draw,
            max_draws=max_draws,
            key_id=key.key_id,
            benign_cost=round(cost, 5),
            bound=bound,
        )
        if cost <= bound:
            return KeyChoice(key, cost, tuple(c for c, _ in drawn))
    cost, key = min(drawn, key=lambda pair: pair[0])
    log.warning(
        "watermark_key_over_bound",
        model=config.name,
        draws=max_draws,
        key_id=key.key_id,
        benign_cost=round(cost, 5),
        bound=bound,
    )
    return KeyChoice(key, cost, tuple(c for c, _ in drawn))
