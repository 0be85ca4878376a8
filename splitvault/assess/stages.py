"""A split model as two callable stages and their wiring, from a deployment or a fresh cut.

The owner's admin host holds the KEK, so the back stage is decrypted here (in memory, through
the private tier's own authenticated loader) to label data with the owner's own model.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from private_core.model_store import ModelLoadFailure, load_back_stage
from shared.keys import LocalFileKeyProvider
from shared.layout import DeployLayout
from shared.manifest import BATCH_DIM, DimSpec, TensorSpec, read_config, read_manifest
from splitvault.packing.split import StagePair

Tensors = dict[str, torch.Tensor]
CHUNK = 256


@dataclass(frozen=True)
class Stages:
    """Front and back modules of one split, and what each back input is made of."""

    split: str
    task: str
    front: nn.Module
    back: nn.Module
    request_inputs: list[str]  # the front's arguments, in order
    front_outputs: list[str]
    back_sources: list[tuple[str, str]]  # ("front", output name) or ("request", input name)
    max_batch: int = CHUNK  # the stages' guards refuse larger batches

    def run_front(self, inputs: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        """The front's outputs for a batch of request inputs."""
        outputs = self.front(*(inputs[name] for name in self.request_inputs))
        return [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)

    def back_args(
        self, activations: list[torch.Tensor], inputs: Mapping[str, torch.Tensor]
    ) -> list[torch.Tensor]:
        """The back's arguments: front outputs that cross, plus request inputs it recomputes from."""
        by_name = dict(zip(self.front_outputs, activations, strict=True))
        return [by_name[n] if kind == "front" else inputs[n] for kind, n in self.back_sources]

    def run_back(
        self, activations: list[torch.Tensor], inputs: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        """The back's output (logits or embeddings)."""
        result = self.back(*self.back_args(activations, inputs))
        if not isinstance(result, torch.Tensor):
            raise ValueError("the back stage must return one tensor")
        return result

    def outputs(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The whole model's output on every row of ``inputs``, in chunks, without gradients."""
        count, size = len(next(iter(inputs.values()))), self.max_batch
        pieces = []
        with torch.inference_mode():
            for start in range(0, count, size):
                chunk = {name: t[start : start + size] for name, t in inputs.items()}
                pieces.append(self.run_back(self.run_front(chunk), chunk))
        return torch.cat(pieces)

    def activations(self, inputs: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        """The front's outputs on every row of ``inputs`` (what a thief holding the front sees)."""
        count, size = len(next(iter(inputs.values()))), self.max_batch
        pieces: list[list[torch.Tensor]] = []
        with torch.inference_mode():
            for start in range(0, count, size):
                pieces.append(
                    self.run_front({n: t[start : start + size] for n, t in inputs.items()})
                )
        return [torch.cat(parts) for parts in zip(*pieces, strict=True)]


def from_deployment(deploy: Path, name: str, kek_file: Path | None = None) -> Stages:
    """The deployed split of model ``name``: the public front and the decrypted back."""
    layout = DeployLayout(deploy)
    front_dir, back_dir = layout.public.model(name), layout.private.model(name)
    if not front_dir.is_dir() or not back_dir.is_dir():
        raise FileNotFoundError(f"no model {name!r} under {layout.public.models}")
    provider = LocalFileKeyProvider.load(kek_file or layout.kek)
    try:
        back = load_back_stage(back_dir, provider)
    except ModelLoadFailure as failure:
        raise ValueError(failure.reason) from None
    manifest = read_manifest(front_dir)
    sources = []
    for spec in back.manifest.inputs:
        kind, _, source = (spec.source or "").partition(":")
        if kind not in ("front", "request"):
            raise ValueError(f"model {name!r}: back input {spec.name!r} has no source")
        sources.append((kind, source))
    return Stages(
        split=read_config(front_dir).split,
        task=back.config.task,
        front=torch.export.load(front_dir / manifest.file).module(),
        back=back.module,
        request_inputs=[spec.name for spec in manifest.inputs],
        front_outputs=[spec.name for spec in manifest.outputs],
        back_sources=sources,
        max_batch=min(CHUNK, *_batch_limits(manifest.inputs)),
    )


def _batch_limits(specs: list[TensorSpec]) -> list[int]:
    return [d.max for s in specs for d in s.shape if isinstance(d, DimSpec) and d.name == BATCH_DIM]


def from_pair(pair: StagePair, split: str, task: str) -> Stages:
    """A split made in memory by ``split_program`` (candidates; nothing is written)."""
    sources = []
    for back_input in pair.back_inputs:
        kind, _, source = back_input.source.partition(":")
        sources.append((kind, source))
    return Stages(
        split=split,
        task=task,
        front=pair.front.module(),
        back=pair.back.module(),
        request_inputs=pair.request_inputs,
        front_outputs=pair.front_outputs,
        back_sources=sources,
        max_batch=min(
            CHUNK, *(high for name, _, high in pair.front_dims.values() if name == BATCH_DIM)
        ),
    )


@dataclass(frozen=True)
class Cost:
    """Parameters and FLOPs (per sample) of each stage."""

    front_parameters: int
    back_parameters: int
    front_flops: int
    back_flops: int

    @property
    def private_parameter_share(self) -> float:
        return _share(self.back_parameters, self.front_parameters)

    @property
    def private_flop_share(self) -> float:
        return _share(self.back_flops, self.front_flops)


def _share(private: int, public: int) -> float:
    return private / (private + public) if private + public else 0.0


def cost(stages: Stages, example: Mapping[str, torch.Tensor]) -> Cost:
    """Count parameters, and FLOPs on one example row (``FlopCounterMode``: matmuls, convs)."""
    row = {name: t[:1] for name, t in example.items()}
    with torch.inference_mode():
        with FlopCounterMode(display=False) as front_counter:
            activations = stages.run_front(row)
        with FlopCounterMode(display=False) as back_counter:
            stages.run_back(activations, row)
    return Cost(
        front_parameters=sum(p.numel() for p in stages.front.parameters()),
        back_parameters=sum(p.numel() for p in stages.back.parameters()),
        front_flops=int(front_counter.get_total_flops()),
        back_flops=int(back_counter.get_total_flops()),
    )


def clone_module(module: nn.Module) -> nn.Module:
    """A deep copy (an exported stage's pytree specs warn when copied; harmless here)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return copy.deepcopy(module)


def fresh_copy(module: nn.Module, generator: torch.Generator) -> nn.Module:
    """The same architecture with new weights, drawn like PyTorch's layer defaults.

    Weights of two or more dimensions get Kaiming-uniform (a=sqrt(5)), as ``nn.Linear`` and
    ``nn.Conv*`` do; a bias gets U(-1/sqrt(fan_in), 1/sqrt(fan_in)) of its layer's weight; a
    one-dimensional weight without a sibling matrix (a norm's scale) is set to one.
    """
    clone = clone_module(module)
    params = dict(clone.named_parameters())
    with torch.no_grad():
        for name, param in params.items():
            prefix, _, leaf = name.rpartition(".")
            sibling = params.get(f"{prefix}.weight" if prefix else "weight")
            if param.dim() >= 2:
                fan_in = param[0].numel()
                bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform_(a=sqrt(5)) reduces to this
                param.uniform_(-bound, bound, generator=generator)
            elif sibling is not None and sibling.dim() >= 2 and leaf == "bias":
                bound = 1.0 / math.sqrt(sibling[0].numel())
                param.uniform_(-bound, bound, generator=generator)
            elif leaf == "bias":
                param.zero_()
            else:
                param.fill_(1.0)
        for name, buffer in clone.named_buffers():
            if name.endswith("running_mean"):
                buffer.zero_()
            elif name.endswith("running_var"):
                buffer.fill_(1.0)
    return clone
