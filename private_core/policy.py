"""Output policies: the only answers that may leave the private tier.

Raw logits never leave: a classifier answers with top-k probabilities rounded to N decimals or
the label alone; an embedding model answers with rounded values. Rounded values travel as FP64
so their decimal form stays short and exact on the way to JSON.

A model with a watermark (``config.watermark``) is marked here, before rounding: the label
watermark answers the queries the model is unsure of in keyed regions with the runner-up (or,
with per-query marks, a keyed share of them with a keyed other class), first in the top-k with
the model's sorted scores kept; the signal watermark moves a little probability from the top-1
class to a keyed other class in every answer, never changing the top-1 class. See
``private_core.watermark``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import torch

from private_core.watermark.answers import relabel_top_k, shift_to_class
from private_core.watermark.engine import Marking, QueryContext
from private_core.watermark.marks import watermark_labels
from shared.logs import get_logger
from shared.manifest import LabelPolicy, ModelConfig, RoundingPolicy, TopKPolicy

if TYPE_CHECKING:
    from private_core.model_store import BackStage

INDICES, SCORES, EMBEDDING = "indices", "scores", "embedding"
log = get_logger(__name__)


def restrict(
    stage: BackStage,
    output: torch.Tensor,
    inputs: Mapping[str, Any],
    requested_k: int = 0,
    *,
    context: QueryContext | None = None,
) -> dict[str, Any]:
    """Everything applied to one request's raw back-stage output before it may leave.

    ``inputs`` are the request's back-stage inputs (one row per sample), for per-query
    decisions made in this tier; ``context`` (``QueryContext.of(request)``) names who asked, for
    the trigger log.
    """
    return _Together(stage, [output], [inputs], requested_k).answer(0, inputs, context)


def restrict_many(
    stage: BackStage,
    outputs: Sequence[torch.Tensor],
    inputs: Sequence[Mapping[str, Any]],
    requested_ks: Sequence[int],
    contexts: Sequence[QueryContext | None],
) -> list[dict[str, Any] | Exception]:
    """``restrict`` of each request of one batch, the same answers and trigger records: the
    requests asking for the same k whose inputs and outputs have the same shapes are marked
    and restricted in one pass over their rows (each of those steps is row by row), each
    request keeping its own trigger record. A request that fails gets its error alone."""
    results: list[dict[str, Any] | Exception | None] = [None] * len(outputs)
    groups: dict[tuple[Any, ...], list[int]] = {}
    for index, (output, arrays, k) in enumerate(zip(outputs, inputs, requested_ks, strict=True)):
        shapes = tuple((name, np.shape(arrays[name])[1:]) for name in sorted(arrays))
        groups.setdefault((k, tuple(output.shape[1:]), shapes), []).append(index)
    for (k, _, _), members in groups.items():
        if len(members) == 1:
            continue
        try:
            together = _Together(
                stage, [outputs[i] for i in members], [inputs[i] for i in members], k
            )
        except Exception:  # each alone below: a bad request fails alone
            log.warning("restrict_batch_failed", model=stage.config.name, requests=len(members))
            continue
        for position, index in enumerate(members):
            try:
                results[index] = together.answer(position, inputs[index], contexts[index])
            except Exception as error:
                results[index] = error
    for index, result in enumerate(results):
        if result is None:
            try:
                results[index] = restrict(
                    stage,
                    outputs[index],
                    inputs[index],
                    requested_ks[index],
                    context=contexts[index],
                )
            except Exception as error:
                results[index] = error
    return [result for result in results if result is not None]


class _Together:
    """One or several requests' rows marked and restricted in one pass; ``answer`` gives each
    its own rows and queues its own trigger record."""

    def __init__(
        self,
        stage: BackStage,
        outputs: Sequence[torch.Tensor],
        inputs: Sequence[Mapping[str, Any]],
        k: int,
    ) -> None:
        self.alone = len(outputs) == 1
        output = outputs[0] if self.alone else torch.cat(list(outputs))
        arrays = (
            inputs[0]
            if self.alone
            else {
                name: np.concatenate([np.asarray(one[name]) for one in inputs])
                for name in inputs[0]
            }
        )
        self.watermark = stage.watermark if stage.config.task == "classification" else None
        self.marking: Marking | None = None
        self.probabilities: npt.NDArray[np.float64] | None = None
        if self.watermark is not None:
            self.probabilities = torch.softmax(output.to(torch.float64), dim=-1).numpy()
            self.marking = self.watermark.marking(arrays, self.probabilities)
        self.restricted = apply_policy(stage.config, output, k, self.marking)
        self.starts = np.cumsum([0, *(len(one) for one in outputs)]).tolist()

    def answer(
        self, position: int, inputs: Mapping[str, Any], context: QueryContext | None
    ) -> dict[str, Any]:
        start, stop = self.starts[position], self.starts[position + 1]
        answer = self.restricted
        if not self.alone:
            answer = {name: value[start:stop] for name, value in answer.items()}
        marking, probabilities, watermark = self.marking, self.probabilities, self.watermark
        # Every request is recorded, marked or not: equal work on both.
        if watermark and marking and probabilities is not None and marking.scheme == "label":
            top1 = probabilities[start:stop].argmax(axis=1)
            own = marking if self.alone else marking.rows(start, stop)
            watermark.record(own, inputs, top1, answer[INDICES][:, 0], context)
        return answer


def apply_policy(
    config: ModelConfig,
    output: torch.Tensor,
    requested_k: int = 0,
    marking: Marking | None = None,
) -> dict[str, Any]:
    """Restrict a back stage's raw output to what the model's policy allows to leave."""
    policy = config.policy
    if isinstance(policy, TopKPolicy):
        return _top_k(output, policy, requested_k, marking)
    if isinstance(policy, LabelPolicy):
        top1 = output.argmax(dim=-1).to(torch.int64).numpy()
        if marking is not None and marking.scheme == "label":
            top1 = _relabel(top1, marking, output.shape[-1])
        return {INDICES: top1[:, None]}
    if isinstance(policy, RoundingPolicy):
        return {EMBEDDING: np.round(output.to(torch.float64).numpy(), policy.decimals)}
    raise TypeError(f"unknown policy {policy!r}")


def _top_k(
    logits: torch.Tensor, policy: TopKPolicy, requested_k: int, marking: Marking | None
) -> dict[str, Any]:
    k = min(requested_k or policy.k, policy.k, logits.shape[-1])
    probabilities = torch.softmax(logits.to(torch.float64), dim=-1)
    if marking is not None and marking.scheme == "signal":
        p = probabilities.numpy()
        targets = watermark_labels(p.argmax(axis=1), marking.marks.signal_offsets, p.shape[-1])
        probabilities = torch.from_numpy(shift_to_class(p, targets, marking.amplitude))
    scores_t, indices_t = torch.topk(probabilities, k, dim=-1)
    indices, scores = indices_t.to(torch.int64).numpy(), scores_t.numpy()
    if marking is not None and marking.scheme == "label":
        p = probabilities.numpy()
        labels = marking.labels(p.argmax(axis=1), p.shape[-1])
        indices, scores = relabel_top_k(indices, scores, p, marking.marks.selected, labels)
    return {INDICES: indices, SCORES: np.round(scores, policy.decimals)}


def _relabel(top1: npt.NDArray[np.int64], marking: Marking, classes: int) -> npt.NDArray[np.int64]:
    labels = marking.labels(top1, classes)
    return np.where(marking.marks.selected, labels, top1)
