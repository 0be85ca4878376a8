"""What a model factory hands to ``splitvault pack``."""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from shared.manifest import BATCH_DIM

Task = Literal["classification", "embedding"]


@dataclass(frozen=True)
class BenignData:
    """The owner's labelled benign samples: request inputs by name and the class of each."""

    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor


@dataclass
class ModelSpec:
    """A model ready to pack: the module, named example inputs and their dynamic dimensions.

    ``dynamic_dims`` maps an input name to {dimension index: dimension name}; inputs sharing a
    name share a size (e.g. ``batch`` and ``seq``). By default dimension 0 of every input is
    the batch. ``value_ranges`` bounds integer inputs (token ids), so bad ids are refused with a
    400 before any compute. ``max_sizes`` caps named dimensions (e.g. ``seq`` at 512).
    """

    module: torch.nn.Module
    example_inputs: dict[str, torch.Tensor]
    dynamic_dims: dict[str, dict[int, str]] = field(default_factory=dict)
    value_ranges: dict[str, tuple[int, int]] = field(default_factory=dict)
    max_sizes: dict[str, int] = field(default_factory=dict)
    task: Task = "classification"
    labels: list[str] | None = None
    # Natural data the model serves (a few hundred samples or more): its front-stage activations
    # become the reference profile the extraction monitor compares queries against.
    reference_inputs: dict[str, torch.Tensor] | None = None
    # A text model's tokenizer (``tokenizers`` JSON): copied to the public tier, which then
    # takes text as well as token ids (sentences truncated to the largest sequence length).
    tokenizer: Path | None = None
    # The owner's labelled benign data (issue 14): request inputs and their true classes. At pack
    # the watermark key is redrawn until its marks cost at most 0.25 % top-1 accuracy on it.
    benign_inputs: dict[str, torch.Tensor] | None = None
    benign_labels: torch.Tensor | None = None

    def benign_data(self) -> BenignData | None:
        """The labelled benign data, or None where either part is missing."""
        if self.benign_inputs is None or self.benign_labels is None:
            return None
        return BenignData(self.benign_inputs, self.benign_labels)

    def dims_for(self, name: str) -> dict[int, str]:
        """Dynamic dimensions of one input (batch on dimension 0 unless told otherwise)."""
        return self.dynamic_dims.get(name, {0: BATCH_DIM})


def spec_from_factory_result(result: object) -> ModelSpec:
    """Accept a ``ModelSpec`` or ``(module, example)`` from a factory.

    The example is a tensor (bound to the first parameter of the module's ``forward``), a
    tuple of tensors (bound to the first parameters in order) or a dict {parameter: tensor}.
    """
    if isinstance(result, ModelSpec):
        return result
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], torch.nn.Module):
        module, example = result
        names = list(inspect.signature(module.forward).parameters)
        if isinstance(example, torch.Tensor):
            example = (example,)
        if isinstance(example, tuple | list) and 0 < len(example) <= len(names):
            example = dict(zip(names, example, strict=False))
        if isinstance(example, Mapping) and _all_tensors(example.values()):
            return ModelSpec(module=module, example_inputs=dict(example))
    raise TypeError("a factory must return a ModelSpec or (nn.Module, example tensor or dict)")


def _all_tensors(values: Iterable[object]) -> bool:
    items = list(values)
    return bool(items) and all(isinstance(v, torch.Tensor) for v in items)
