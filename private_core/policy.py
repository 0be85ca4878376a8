"""Output policies: the only answers that may leave the private tier.

Raw logits never leave: a classifier answers with top-k probabilities rounded to N decimals or
the label alone; an embedding model answers with rounded values. Rounded values travel as FP64
so their decimal form stays short and exact on the way to JSON.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from shared.manifest import LabelPolicy, ModelConfig, RoundingPolicy, TopKPolicy

if TYPE_CHECKING:
    from private_core.model_store import BackStage

INDICES, SCORES, EMBEDDING = "indices", "scores", "embedding"


def restrict(
    stage: BackStage, output: torch.Tensor, inputs: Mapping[str, Any], requested_k: int = 0
) -> dict[str, Any]:
    """Everything applied to one request's raw back-stage output before it may leave.

    ``inputs`` are the request's back-stage inputs (one row per sample), for per-query
    decisions made in this tier.
    """
    return apply_policy(stage.config, output, requested_k)


def apply_policy(config: ModelConfig, output: torch.Tensor, requested_k: int = 0) -> dict[str, Any]:
    """Restrict a back stage's raw output to what the model's policy allows to leave."""
    policy = config.policy
    if isinstance(policy, TopKPolicy):
        return _top_k(output, policy, requested_k)
    if isinstance(policy, LabelPolicy):
        return {INDICES: output.argmax(dim=-1, keepdim=True).to(torch.int64).numpy()}
    if isinstance(policy, RoundingPolicy):
        return {EMBEDDING: np.round(output.to(torch.float64).numpy(), policy.decimals)}
    raise TypeError(f"unknown policy {policy!r}")


def _top_k(logits: torch.Tensor, policy: TopKPolicy, requested_k: int) -> dict[str, Any]:
    k = min(requested_k or policy.k, policy.k, logits.shape[-1])
    probabilities = torch.softmax(logits.to(torch.float64), dim=-1)
    scores, indices = torch.topk(probabilities, k, dim=-1)
    return {
        INDICES: indices.to(torch.int64).numpy(),
        SCORES: np.round(scores.numpy(), policy.decimals),
    }
