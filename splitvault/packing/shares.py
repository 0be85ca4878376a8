"""How much of a model each split point keeps private: parameters and FLOPs per tier.

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` node by node over the
exported graph run on its example inputs, so they cover what it counts (matrix products,
convolutions, attention), not element-wise operations.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx
from torch.export import ExportedProgram
from torch.utils.flop_counter import FlopCounterMode

from splitvault.errors import PackError, SplitError
from splitvault.packing.split import flatten, module_cuts, plan_cut, symbol_table

# `pack` warns below this share of the parameters kept private, and refuses below the floor
# unless --force: a model split that leaves most weights on the internet-facing host.
PRIVATE_SHARE_WARNING = 0.50
PRIVATE_SHARE_FLOOR = 0.10


@dataclass(frozen=True)
class Shares:
    """Parameters (buffers and constants included) and FLOPs of each tier for one cut."""

    public_parameters: int
    private_parameters: int
    public_flops: int
    private_flops: int

    @property
    def private_parameter_share(self) -> float:
        return _share(self.private_parameters, self.public_parameters)

    @property
    def private_flop_share(self) -> float:
        return _share(self.private_flops, self.public_flops)


@dataclass(frozen=True)
class Candidate:
    """A split point: the submodule names that cut there, what crosses, and the shares."""

    split: str
    aliases: tuple[str, ...]
    crossing: tuple[str, ...]  # shapes, e.g. "batch x 128"
    main_path: bool  # exactly one activation crosses (no skip path around the cut)
    shares: Shares


def private_share(public_parameters: int, private_parameters: int) -> float:
    """The private tier's share of the parameters (0 when the model has none)."""
    return _share(private_parameters, public_parameters)


def check_private_share(public: int, private: int, split: str, floor: float) -> None:
    """Refuse a cut that keeps less than ``floor`` of the parameters private."""
    share = private_share(public, private)
    if share < floor:
        raise PackError(
            f"a split after {split!r} keeps only {share:.1%} of the parameters private",
            cause=f"the floor is {floor:.0%}: the rest would sit on the internet-facing host",
            fix="split at an earlier submodule (`splitvault inspect` lists the shares), or --force",
        )


def _share(private: int, public: int) -> float:
    total = private + public
    return private / total if total else 0.0


def node_flops(gm: fx.GraphModule, args: list[Any]) -> dict[fx.Node, int]:
    """FLOPs of each node of ``gm`` when run on ``args``."""
    counter = FlopCounterMode(display=False)
    flops: dict[fx.Node, int] = {}

    class _Counting(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            before = counter.get_total_flops()
            result = super().run_node(n)
            flops[n] = counter.get_total_flops() - before
            return result

    with torch.no_grad(), counter:
        _Counting(gm).run(*args)
    return flops


def split_candidates(
    program: ExportedProgram, dim_names: Mapping[str, Mapping[int, str]] | None = None
) -> list[Candidate]:
    """Every submodule the model can be cut after, in execution order, with its shares."""
    gm, placeholders, compute = flatten(program)
    if program.example_inputs is None:
        raise SplitError("the exported program carries no example inputs to count FLOPs with")
    args, kwargs = program.example_inputs
    flops = node_flops(gm, [*args, *kwargs.values()])
    names = {
        key: name
        for key, (name, _low, _high) in symbol_table(program, placeholders, dim_names).items()
    }
    attrs = [_attrs_of(node) for node in compute]
    sizes = {target: _numel(gm, target) for used in attrs for target in used}
    by_cut: dict[int, list[str]] = {}
    for path, cut in module_cuts(compute).items():
        by_cut.setdefault(cut, []).append(path)
    candidates = []
    for cut in sorted(by_cut):
        if cut == len(compute) - 1:
            continue
        try:
            crossing = plan_cut(compute, cut).crossing
        except SplitError:
            continue
        if not crossing:
            continue
        front, back = set().union(*attrs[: cut + 1]), set().union(*attrs[cut + 1 :])
        shares = Shares(
            public_parameters=sum(sizes[t] for t in front),
            private_parameters=sum(sizes[t] for t in back),
            public_flops=sum(flops.get(n, 0) for n in compute[: cut + 1]),
            private_flops=sum(flops.get(n, 0) for n in compute[cut + 1 :]),
        )
        shapes = tuple(_shape(node, names) for node in crossing)
        candidates.append(
            Candidate(by_cut[cut][0], tuple(by_cut[cut][1:]), shapes, len(crossing) == 1, shares)
        )
    return _merge_equivalent(candidates)


def _merge_equivalent(candidates: list[Candidate]) -> list[Candidate]:
    """One row for neighbouring cuts that differ only by parameter-free nodes (a ReLU): same
    tensors crossing, same shares; it is named by its shortest submodule path."""
    merged: list[Candidate] = []
    for candidate in candidates:
        last = merged[-1] if merged else None
        if last and (last.crossing, last.shares) == (candidate.crossing, candidate.shares):
            paths = sorted(
                [last.split, *last.aliases, candidate.split, *candidate.aliases],
                key=lambda p: (p.count("."), p),
            )
            merged[-1] = dataclasses.replace(last, split=paths[0], aliases=tuple(paths[1:]))
        else:
            merged.append(candidate)
    return merged


def _attrs_of(node: fx.Node) -> set[str]:
    return {str(s.target) for s in node.all_input_nodes if s.op == "get_attr"}


def _numel(gm: fx.GraphModule, target: str) -> int:
    value = functools.reduce(getattr, target.split("."), gm)
    return value.numel() if isinstance(value, torch.Tensor) else 0


def _shape(node: fx.Node, names: Mapping[str, str]) -> str:
    dims = [names.get(str(d), str(d)) for d in node.meta["val"].shape]
    return " x ".join(dims) if dims else "scalar"
