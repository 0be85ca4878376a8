"""Put an assessment together: which splits, which data, both thieves on each, the report."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from splitvault.assess import report
from splitvault.assess.data import load_inputs
from splitvault.assess.experiment import (
    Settings,
    SplitAssessment,
    assess_split,
    make_victim,
    partition,
    subset,
)
from splitvault.assess.stages import Stages, from_deployment, from_pair
from splitvault.packing.factory import load_factory
from splitvault.packing.split import SplitError, export_model, split_program


@dataclass(frozen=True)
class Request:
    """What to assess. Without ``candidates``, the deployed split of ``model`` in ``deploy``;
    with them, the model from ``factory`` (or ``program``) cut at each candidate."""

    data: str
    model: str = "model"
    deploy: Path | None = None
    kek_file: Path | None = None
    factory: str | None = None
    program: Path | None = None
    task: str | None = None
    candidates: list[str] = field(default_factory=list)
    public_init: str | None = None  # a factory of public pretrained weights, same architecture
    tokenizer: Path | None = None
    settings: Settings = field(default_factory=Settings)
    show_progress: bool = True


@dataclass(frozen=True)
class Outcome:
    """The assessments, one per split, and the lines to print."""

    assessments: list[SplitAssessment]
    lines: list[str]


def run_assessment(request: Request) -> Outcome:
    """Assess every split of ``request`` and format the report."""
    splits = _splits(request)
    valid = [s for s in splits if isinstance(s, Stages)]
    if not valid:
        errors = [SplitAssessment(split=s[0], error=s[1]) for s in splits if isinstance(s, tuple)]
        return Outcome(errors, [line for e in errors for line in report.split_table(e)])
    first = valid[0]
    inputs = load_inputs(request.data, first.request_inputs, first.task, request.tokenizer)
    inputs = subset(inputs, request.settings)
    _, heldout = partition(len(next(iter(inputs.values()))), request.settings)
    public = _public_init(request, [s.split for s in valid])
    lines = [
        report.header(request.model, first.task, _rows(inputs), len(heldout), request.settings)
    ]
    assessments: list[SplitAssessment] = []
    baseline: dict[tuple[int, int], float] = {}  # black-box fidelity, the same for every split
    total = len(valid) * request.settings.runs_per_split
    with tqdm(total=total, desc="assess", unit="run", disable=not request.show_progress) as bar:
        for split in splits:
            if not isinstance(split, Stages):
                assessments.append(SplitAssessment(split=split[0], error=split[1]))
            else:
                bar.set_postfix_str(split.split)
                start = public.get(split.split)
                if start is not None:
                    check_same_architecture(split, start)
                victim = make_victim(split, inputs, start)
                assessments.append(assess_split(victim, request.settings, bar.update, baseline))
            lines += report.split_table(assessments[-1])
    if request.candidates:
        lines.append(report.recommendation(assessments))
    return Outcome(assessments, lines)


def _rows(inputs: dict[str, torch.Tensor]) -> int:
    return len(next(iter(inputs.values())))


def _splits(request: Request) -> list[Stages | tuple[str, str]]:
    if not request.candidates:
        if request.deploy is None:
            raise ValueError("give --deploy (the deployed split) or --candidates with --factory")
        return [from_deployment(request.deploy, request.model, request.kek_file)]
    program, dims, task = _source(request.factory, request.program, request.task)
    splits: list[Stages | tuple[str, str]] = []
    for candidate in request.candidates:
        try:
            pair = split_program(program, candidate, dims)
        except SplitError as error:
            splits.append((candidate, str(error)))
            continue
        splits.append(from_pair(pair, candidate, task))
    return splits


def _source(factory: str | None, program: Path | None, task: str | None) -> tuple[Any, Any, str]:
    """The whole model as an exported program, its dimension names and its task."""
    if factory is not None:
        spec = load_factory(factory)
        return export_model(spec), spec.dynamic_dims or None, task or spec.task
    if program is not None:
        return torch.export.load(program), None, task or "classification"
    raise ValueError("--candidates re-splits the original model: give --factory or --program")


def _public_init(request: Request, splits: list[str]) -> dict[str, Stages]:
    """Public pretrained weights cut at each split, for the thieves to start from."""
    if request.public_init is None:
        return {}
    spec = load_factory(request.public_init)
    program = export_model(spec)
    stages = {}
    for split in splits:
        pair = split_program(program, split, spec.dynamic_dims or None)
        stages[split] = from_pair(pair, split, spec.task)
    return stages


def check_same_architecture(victim: Stages, public: Stages) -> None:
    """Public weights must fit the victim's stages tensor for tensor."""
    for stage in ("front", "back"):
        mine = {n: p.shape for n, p in getattr(victim, stage).named_parameters()}
        theirs = {n: p.shape for n, p in getattr(public, stage).named_parameters()}
        if mine != theirs:
            raise ValueError(f"--public-init does not match the model's {stage} stage")
