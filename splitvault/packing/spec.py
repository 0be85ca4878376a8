"""What a model factory hands to ``splitvault pack``."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch

from shared.manifest import BATCH_DIM

Task = Literal["classification", "embedding"]


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

    def dims_for(self, name: str) -> dict[int, str]:
        """Dynamic dimensions of one input (batch on dimension 0 unless told otherwise)."""
        return self.dynamic_dims.get(name, {0: BATCH_DIM})


def spec_from_factory_result(result: object) -> ModelSpec:
    """Accept a ``ModelSpec`` or a ``(module, example_input)`` pair from a factory.

    A lone example tensor is bound to the first parameter of the module's ``forward``.
    """
    if isinstance(result, ModelSpec):
        return result
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], torch.nn.Module):
        module, example = result
        if isinstance(example, torch.Tensor):
            first = next(iter(inspect.signature(module.forward).parameters))
            return ModelSpec(module=module, example_inputs={first: example})
        if isinstance(example, Mapping):
            return ModelSpec(module=module, example_inputs=dict(example))
    raise TypeError("a factory must return a ModelSpec or (nn.Module, example tensor or dict)")


def load_factory(reference: str) -> ModelSpec:
    """Import ``pkg.module:function`` and call it."""
    module_name, _, function_name = reference.partition(":")
    if not module_name or not function_name:
        raise ValueError(f"factory {reference!r} must look like pkg.module:function")
    factory = getattr(importlib.import_module(module_name), function_name)
    return spec_from_factory_result(factory())
