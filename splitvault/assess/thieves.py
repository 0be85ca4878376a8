"""The two thieves an assessment compares, trained on the same queries with the same budget.

* **front-known**: holds the public front (it owns the public host) and the back's
  architecture (the strong case: a model card or a guess names it), not its weights. It runs
  the real front on its queries and trains a fresh back on the model's answers.
* **black-box**: holds the architecture only, and trains the whole model, fresh, on the same
  answers (optionally starting from public pretrained weights, ``public_init``).

Classifier thieves learn from top-1 labels only (cross-entropy); embedder thieves from the
embeddings (1 - cosine). Fidelity is measured on held-out inputs neither thief queried.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from splitvault.assess.stages import Stages, Tensors, clone_module, fresh_copy

Forward = Callable[[torch.Tensor], torch.Tensor]  # row indices -> model outputs


@dataclass(frozen=True)
class Training:
    """How each thief trains: Adam, a fixed number of steps whatever the budget."""

    steps: int = 300
    batch_size: int = 32
    learning_rate: float = 1e-3


@dataclass(frozen=True)
class Victim:
    """What the thieves copy: the split model, its natural inputs and its outputs on them."""

    stages: Stages
    inputs: Tensors
    outputs: torch.Tensor  # the model's own outputs on every row (logits or embeddings)
    activations: list[torch.Tensor]  # the real front's outputs on every row
    public_init: Stages | None = None  # public pretrained weights for thieves to start from

    @property
    def labels(self) -> torch.Tensor:
        return self.outputs.argmax(dim=-1)

    def targets(self) -> torch.Tensor:
        """What a thief learns from: top-1 labels (classifiers) or embeddings."""
        return self.labels if self.stages.task == "classification" else self.outputs


def front_known(victim: Victim, rows: torch.Tensor, training: Training, seed: int) -> Forward:
    """Train a fresh back on the real front's activations of ``rows``; return its forward."""
    generator = torch.Generator().manual_seed(seed)
    back = _start(victim, "back", generator)

    def forward(index: torch.Tensor) -> torch.Tensor:
        acts = [a[index] for a in victim.activations]
        return _run(back, victim.stages.back_args(acts, _rows(victim.inputs, index)))

    _fit(forward, back.parameters(), victim, rows, training, generator)
    return forward


def black_box(victim: Victim, rows: torch.Tensor, training: Training, seed: int) -> Forward:
    """Train a fresh whole model on the answers to ``rows``; return its forward."""
    generator = torch.Generator().manual_seed(seed)
    thief = dataclasses.replace(
        victim.stages,
        front=_start(victim, "front", generator),
        back=_start(victim, "back", generator),
    )

    def forward(index: torch.Tensor) -> torch.Tensor:
        chunk = _rows(victim.inputs, index)
        return thief.run_back(thief.run_front(chunk), chunk)

    params = [*thief.front.parameters(), *thief.back.parameters()]
    _fit(forward, params, victim, rows, training, generator)
    return forward


def fidelity(forward: Forward, victim: Victim, rows: torch.Tensor) -> float:
    """Top-1 agreement (classifiers) or mean cosine (embedders) with the model on ``rows``."""
    outputs, size = [], victim.stages.max_batch
    with torch.no_grad():
        for start in range(0, len(rows), size):
            outputs.append(forward(rows[start : start + size]))
    predicted = torch.cat(outputs)
    if victim.stages.task == "classification":
        agree = predicted.argmax(dim=-1) == victim.labels[rows]
        return float(agree.float().mean())
    cosine = nn.functional.cosine_similarity(predicted, victim.outputs[rows], dim=-1)
    return float(cosine.mean())


def _start(victim: Victim, stage: str, generator: torch.Generator) -> nn.Module:
    source = victim.public_init or victim.stages
    module: nn.Module = getattr(source, stage)
    if victim.public_init is not None:
        return clone_module(module)
    return fresh_copy(module, generator)


def _rows(inputs: Mapping[str, torch.Tensor], index: torch.Tensor) -> Tensors:
    return {name: tensor[index] for name, tensor in inputs.items()}


def _run(back: nn.Module, args: list[torch.Tensor]) -> torch.Tensor:
    result = back(*args)
    if not isinstance(result, torch.Tensor):
        raise ValueError("the back stage must return one tensor")
    return result


def _fit(
    forward: Forward,
    params: object,
    victim: Victim,
    rows: torch.Tensor,
    training: Training,
    generator: torch.Generator,
) -> None:
    optimiser = torch.optim.Adam(params, lr=training.learning_rate)  # type: ignore[arg-type]
    targets = victim.targets()
    batch = min(training.batch_size, len(rows), victim.stages.max_batch)
    for _ in range(training.steps):
        pick = rows[torch.randperm(len(rows), generator=generator)[:batch]]
        optimiser.zero_grad()
        loss = _loss(forward(pick), targets[pick], victim.stages.task)
        loss.backward()  # type: ignore[no-untyped-call]
        optimiser.step()


def _loss(outputs: torch.Tensor, targets: torch.Tensor, task: str) -> torch.Tensor:
    if task == "classification":
        return nn.functional.cross_entropy(outputs, targets)
    return 1.0 - nn.functional.cosine_similarity(outputs, targets, dim=-1).mean()
