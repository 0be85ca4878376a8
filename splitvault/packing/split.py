"""Cut an exported program at a named submodule into a front and a back program.

The front holds every node up to the last one computed inside the split submodule; the back
holds the rest. What the back needs from the front crosses the wire, with two refinements
that keep the wire small and the tiers apart:

* a tensor the back needs that is derived from request inputs alone, with no parameter or
  buffer (a broadcast 4-D attention mask), is recomputed in the back from the raw input (the
  2-D mask) instead of crossing;
* a symbolic size (batch, sequence) is read back from a tensor that crosses anyway.

Each stage is then exported again on its own, so it holds only its own parameters.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx
from torch.export import Dim, ExportedProgram

from shared.manifest import BATCH_DIM
from splitvault.errors import SplitError
from splitvault.packing.diagnose import (
    check_split_name,
    check_top_level_names,
    traced,
)
from splitvault.packing.spec import ModelSpec

__all__ = [
    "BackInput",
    "SplitError",
    "StagePair",
    "export_model",
    "flatten",
    "module_cuts",
    "plan_cut",
    "split_program",
    "symbol_table",
]

_SYM_SIZE = torch.ops.aten.sym_size.int


@dataclass(frozen=True)
class BackInput:
    """One input of the back stage and where its value comes from."""

    name: str
    source: str  # "front:<name>" or "request:<input name>"


@dataclass
class StagePair:
    """The two exported stages and the wiring between them."""

    front: ExportedProgram
    back: ExportedProgram
    request_inputs: list[str]
    front_outputs: list[str]
    back_inputs: list[BackInput]
    # Per stage: symbol in that program (``s0``) -> (dimension name, min, max).
    front_dims: dict[str, tuple[str, int, int]] = field(default_factory=dict)
    back_dims: dict[str, tuple[str, int, int]] = field(default_factory=dict)


def export_model(spec: ModelSpec) -> ExportedProgram:
    """Trace ``spec.module`` with dynamic batch (and sequence) dimensions.

    A dynamic dimension of size 1 in an example (``torch.zeros(1, 64)``) is repeated to 2
    first: torch.export would otherwise fix it at 1.
    """
    check_top_level_names(name for name, _child in spec.module.named_children())
    dims: dict[str, Any] = {}
    shapes: dict[str, dict[int, Any]] = {}
    examples: dict[str, torch.Tensor] = {}
    for name, example in spec.example_inputs.items():
        if example.dim() == 0:
            raise SplitError(
                f"example input {name!r} must have a batch dimension",
                cause="a 0-dimensional tensor has no rows to batch",
                fix="give an example of shape (batch, ...), e.g. torch.zeros(2, 64)",
            )
        shapes[name] = {}
        for index, dim_name in spec.dims_for(name).items():
            if dim_name not in dims:
                upper = spec.max_sizes.get(dim_name, 65536)
                dims[dim_name] = Dim(dim_name, min=1, max=upper)
            shapes[name][index] = dims[dim_name]
        examples[name] = _at_least_two(example, spec.dims_for(name))
    module = spec.module.eval()
    with torch.no_grad():
        return traced(lambda: torch.export.export(module, (), examples, dynamic_shapes=shapes))


def _at_least_two(example: torch.Tensor, dims: Mapping[int, str]) -> torch.Tensor:
    """Repeat ``example`` along each of its dynamic dimensions of size 1."""
    for index in dims:
        if index < example.dim() and example.shape[index] == 1:
            example = torch.cat([example, example], dim=index)
    return example


def split_program(
    ep: ExportedProgram, split: str, dim_names: Mapping[str, Mapping[int, str]] | None = None
) -> StagePair:
    """Cut ``ep`` after submodule ``split``.

    ``dim_names`` names the dynamic dimensions of each input ({input: {index: name}}); by
    default dimension 0 is ``batch``.
    """
    gm, placeholders, compute = flatten(ep)
    cut = _cut_index(compute, split)
    plan = plan_cut(compute, cut)
    if not plan.crossing:
        raise SplitError(f"nothing computed up to {split!r} is needed after it; pick a later split")
    symbols = symbol_table(ep, placeholders, dim_names)
    front_gm = _build_front(gm, placeholders, plan.crossing)
    back_gm = _build_back(gm, placeholders, compute[cut + 1 :], plan)
    examples = _example_inputs(ep)
    front_outputs = [n.name for n in plan.crossing]
    with torch.no_grad():
        acts = front_gm(*examples)
    front_ep, front_dims = _export_stage(
        front_gm, examples, [p.meta["val"] for p in placeholders], symbols
    )
    request_by_name = {p.name: examples[i] for i, p in enumerate(placeholders)}
    back_examples = [*acts, *(request_by_name[p.name] for p in plan.request_inputs)]
    back_vals = [
        *(n.meta["val"] for n in plan.crossing),
        *(p.meta["val"] for p in plan.request_inputs),
    ]
    back_ep, back_dims = _export_stage(back_gm, back_examples, back_vals, symbols)
    back_inputs = [BackInput(n, f"front:{n}") for n in front_outputs]
    back_inputs += [BackInput(p.name, f"request:{p.name}") for p in plan.request_inputs]
    return StagePair(
        front=front_ep,
        back=back_ep,
        request_inputs=[p.name for p in placeholders],
        front_outputs=front_outputs,
        back_inputs=back_inputs,
        front_dims=front_dims,
        back_dims=back_dims,
    )


def flatten(ep: ExportedProgram) -> tuple[fx.GraphModule, list[fx.Node], list[fx.Node]]:
    """``ep`` as one graph module without its guard call: the module, its input placeholders
    and its compute nodes in execution order."""
    names = [*ep.state_dict, *ep.constants]
    check_top_level_names({name.split(".")[0] for name in names})
    gm = ep.module()
    _drop_guards(gm)
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    compute = [n for n in graph.nodes if n.op in ("call_function", "call_method", "call_module")]
    return gm, placeholders, compute


def module_cuts(compute: list[fx.Node]) -> dict[str, int]:
    """Each submodule path -> the index in ``compute`` of the last node computed inside it."""
    cuts: dict[str, int] = {}
    for index, node in enumerate(compute):
        for path in _module_paths(node):
            if path:
                cuts[path] = index
    return cuts


def plan_cut(compute: list[fx.Node], cut: int) -> BackPlan:
    """What crosses (and what the back recomputes) when the front ends at ``compute[cut]``."""
    return _plan_back(compute[cut + 1 :], set(compute[: cut + 1]))


def _drop_guards(gm: fx.GraphModule) -> None:
    """Remove the shape-guard call that ``ep.module()`` adds; each stage gets its own guards."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()


def _module_paths(node: fx.Node) -> Iterable[str]:
    stack = node.meta.get("nn_module_stack") or {}
    return (str(path) for path, _type in stack.values())


def _cut_index(compute: list[fx.Node], split: str) -> int:
    inside = [
        i
        for i, node in enumerate(compute)
        if any(p == split or p.startswith(split + ".") for p in _module_paths(node))
    ]
    if not inside:
        check_split_name(split, module_cuts(compute))
        raise SplitError(f"no computation runs inside submodule {split!r}")
    if inside[-1] == len(compute) - 1:
        raise SplitError(
            f"submodule {split!r} computes the model's output; nothing would stay private",
            cause="the back stage would be empty and the whole model on the public tier",
            fix="split at an earlier submodule (`splitvault inspect` lists them)",
        )
    return inside[-1]


@dataclass
class BackPlan:
    """How a cut wires the back: tensors that cross, request inputs forwarded, nodes and
    sizes the back recomputes."""

    crossing: list[fx.Node] = field(default_factory=list)
    request_inputs: list[fx.Node] = field(default_factory=list)
    recompute: set[fx.Node] = field(default_factory=set)
    size_from: dict[fx.Node, tuple[fx.Node, int]] = field(default_factory=dict)


def _is_tensor(node: fx.Node) -> bool:
    return isinstance(node.meta.get("val"), torch.Tensor)


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    todo = list(node.all_input_nodes)
    while todo:
        current = todo.pop()
        if current not in seen:
            seen.add(current)
            todo.extend(current.all_input_nodes)
    return seen


def _plan_back(back_nodes: list[fx.Node], front_set: set[fx.Node]) -> BackPlan:
    plan = BackPlan()
    crossing: set[fx.Node] = set()
    requests: set[fx.Node] = set()
    sizes: list[fx.Node] = []
    for node in back_nodes:
        for source in node.all_input_nodes:
            if source.op == "placeholder":
                requests.add(source)
            elif source in front_set and not _is_tensor(source):
                sizes.append(source)
            elif source in front_set:
                closure = _ancestors(source)
                if any(a.op == "get_attr" for a in closure):
                    crossing.add(source)
                else:  # derived from request inputs alone: recompute, send the raw input
                    plan.recompute |= {source} | {a for a in closure if a.op != "placeholder"}
                    requests |= {a for a in closure if a.op == "placeholder"}
    for size in sizes:
        _plan_size(size, plan, crossing, requests)
    order = {n: i for i, n in enumerate(next(iter(front_set)).graph.nodes)} if front_set else {}
    plan.crossing = sorted(crossing, key=order.__getitem__)
    plan.request_inputs = sorted(requests, key=order.__getitem__)
    return plan


def _plan_size(
    size: fx.Node, plan: BackPlan, crossing: set[fx.Node], requests: set[fx.Node]
) -> None:
    """Read a symbolic size back from a tensor that crosses, or recompute it from sizes."""
    if size in plan.size_from or size in plan.recompute:
        return
    if size.target is _SYM_SIZE:
        wanted = str(size.meta["val"])
        for tensor in [*crossing, *requests]:
            for index, dim in enumerate(tensor.meta["val"].shape):
                if str(dim) == wanted:
                    plan.size_from[size] = (tensor, index)
                    return
        source, index = size.args[0], int(size.args[1])  # type: ignore[arg-type]
        if not isinstance(source, fx.Node):
            raise SplitError(f"cannot resolve size {size.name}")
        (requests if source.op == "placeholder" else crossing).add(source)
        plan.size_from[size] = (source, index)
        return
    if size.target in (operator.mul, operator.add, operator.sub, operator.floordiv):
        plan.recompute.add(size)
        for arg in size.all_input_nodes:
            _plan_size(arg, plan, crossing, requests)
        return
    raise SplitError(
        f"the back stage needs size {size.name} ({size.target}), which cannot be rebuilt"
    )


def _copy_attr(graph: fx.Graph, node: fx.Node, env: dict[fx.Node, fx.Node]) -> fx.Node:
    if node not in env:
        env[node] = graph.node_copy(node, env.__getitem__)
    return env[node]


def _copy_nodes(graph: fx.Graph, nodes: Iterable[fx.Node], env: dict[fx.Node, fx.Node]) -> None:
    for node in nodes:
        for source in node.all_input_nodes:
            if source.op == "get_attr":
                _copy_attr(graph, source, env)
        env[node] = graph.node_copy(node, env.__getitem__)


def _build_front(
    gm: fx.GraphModule, placeholders: list[fx.Node], crossing: list[fx.Node]
) -> fx.GraphModule:
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {p: graph.node_copy(p) for p in placeholders}
    needed: set[fx.Node] = set(crossing)
    for node in crossing:
        needed |= _ancestors(node)
    ordered = [n for n in gm.graph.nodes if n in needed and n.op not in ("placeholder", "get_attr")]
    _copy_nodes(graph, ordered, env)
    graph.output(tuple(env[n] for n in crossing))
    return _finish(gm, graph)


def _build_back(
    gm: fx.GraphModule, placeholders: list[fx.Node], back_nodes: list[fx.Node], plan: BackPlan
) -> fx.GraphModule:
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in [*plan.crossing, *plan.request_inputs]:
        env[node] = graph.placeholder(node.name)
        env[node].meta["val"] = node.meta["val"]
    for size, (tensor, index) in plan.size_from.items():
        env[size] = graph.call_function(_SYM_SIZE, (env[tensor], index))
    recompute = [n for n in gm.graph.nodes if n in plan.recompute]
    _copy_nodes(graph, recompute, env)
    _copy_nodes(graph, back_nodes, env)
    output = next(n for n in gm.graph.nodes if n.op == "output")
    results = output.args[0]
    if isinstance(results, (tuple, list)) and len(results) == 1:
        results = results[0]
    if not isinstance(results, fx.Node) or not _is_tensor(results):
        raise SplitError("the model must return one tensor (logits or embeddings)")
    graph.output(env[results])
    return _finish(gm, graph)


def _finish(root: fx.GraphModule, graph: fx.Graph) -> fx.GraphModule:
    graph.eliminate_dead_code()
    stage = fx.GraphModule(root, graph)  # copies only the attributes this graph references
    stage.recompile()
    return stage.eval()


def symbol_table(
    ep: ExportedProgram,
    placeholders: list[fx.Node],
    dim_names: Mapping[str, Mapping[int, str]] | None,
) -> dict[str, tuple[str, int, int]]:
    """Map each input symbol (``s0``) to its dimension name and range."""
    table: dict[str, tuple[str, int, int]] = {}
    ranges = {str(sym): rng for sym, rng in ep.range_constraints.items()}
    for node in placeholders:
        names = (dim_names or {}).get(node.name, {0: BATCH_DIM})
        for index, dim in enumerate(node.meta["val"].shape):
            if isinstance(dim, torch.SymInt):
                key = str(dim)
                if key in table:
                    continue
                rng = ranges.get(key)
                low = int(rng.lower) if rng is not None else 1
                high = int(rng.upper) if rng is not None and rng.upper.is_finite else 65536
                table[key] = (names.get(index, key), max(low, 1), high)
    return table


def _example_inputs(ep: ExportedProgram) -> list[torch.Tensor]:
    if ep.example_inputs is None:
        raise SplitError(
            "the exported program carries no example inputs to trace the stages with",
            cause="splitvault re-exports each stage from the program's example inputs",
            fix="export with example args (torch.export.export(model, (x,), ...)) and save that",
        )
    args, kwargs = ep.example_inputs
    return [*args, *kwargs.values()]


def _export_stage(
    stage: fx.GraphModule,
    examples: list[torch.Tensor],
    vals: list[Any],
    symbols: dict[str, tuple[str, int, int]],
) -> tuple[ExportedProgram, dict[str, tuple[str, int, int]]]:
    """Export one stage; also return its own symbol table (symbols differ per program)."""
    dims = {key: Dim(name, min=low, max=high) for key, (name, low, high) in symbols.items()}
    shapes: list[dict[int, Any]] = []
    for val in vals:
        spec: dict[int, Any] = {}
        for index, dim in enumerate(val.shape):
            if isinstance(dim, torch.SymInt):
                if str(dim) not in dims:
                    raise SplitError(f"an activation has a derived size {dim}; split elsewhere")
                spec[index] = dims[str(dim)]
        shapes.append(spec)
    with torch.no_grad():
        program = traced(
            lambda: torch.export.export(stage, tuple(examples), dynamic_shapes=tuple(shapes))
        )
    program.example_inputs = None  # never ship example data with a stage
    table: dict[str, tuple[str, int, int]] = {}
    users = set(program.graph_signature.user_inputs)
    stage_inputs = [n for n in program.graph.nodes if n.op == "placeholder" and n.name in users]
    for node, spec in zip(stage_inputs, shapes, strict=True):
        for index, dim in spec.items():
            table[str(node.meta["val"].shape[index])] = symbols[_key_of(dim, symbols)]
    return program, table


def _key_of(dim: Any, symbols: dict[str, tuple[str, int, int]]) -> str:
    return next(key for key, (name, _low, _high) in symbols.items() if name == dim.__name__)
