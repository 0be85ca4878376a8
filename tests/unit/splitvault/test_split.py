"""Cutting exported programs: front then back must equal the unsplit model, and nothing leaks."""

from __future__ import annotations

import re
from collections.abc import Mapping

import pytest
import torch
from torch.export import ExportedProgram

from splitvault.demo import digits, minilm
from splitvault.demo.digits import DigitsCNN
from splitvault.packing.spec import ModelSpec
from splitvault.packing.split import SplitError, StagePair, export_model, split_program
from tests.support.models import nested_spec

ATOL = 1e-5
NESTED_SPLITS = {  # split point -> prefixes of the parameters the front must hold
    "embed": ["embed"],
    "encoder.blocks.0": ["embed", "encoder.blocks.0"],
    "encoder.blocks.1.mlp.0": [
        "embed", "encoder.blocks.0", "encoder.blocks.1.norm", "encoder.blocks.1.mlp.0",
    ],
    "encoder.blocks.2": ["embed", "encoder.blocks"],
}  # fmt: skip


def run_pair(pair: StagePair, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Run the front on the request, then the back on what crosses plus forwarded inputs."""
    with torch.no_grad():
        front_out = pair.front.module()(*(inputs[name] for name in pair.request_inputs))
        if isinstance(front_out, torch.Tensor):
            front_out = (front_out,)
        crossing = dict(zip(pair.front_outputs, front_out, strict=True))
        args = []
        for back_input in pair.back_inputs:
            kind, _, name = back_input.source.partition(":")
            args.append(crossing[name] if kind == "front" else inputs[name])
        result = pair.back.module()(*args)
    assert isinstance(result, torch.Tensor)
    return result


def unsplit(spec: ModelSpec, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        result = spec.module(**inputs)
    assert isinstance(result, torch.Tensor)
    return result


def user_input_vals(ep: ExportedProgram) -> list[torch.Tensor]:
    """The fake tensors of a program's user inputs, in order."""
    users = ep.graph_signature.user_inputs
    by_name = {n.name: n.meta["val"] for n in ep.graph.nodes if n.op == "placeholder"}
    return [by_name[name] for name in users]


def _tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers, persistent or not (a stage may hold a non-persistent buffer)."""
    return dict(module.named_parameters()) | dict(module.named_buffers())


def assert_parameters_split(
    pair: StagePair, module: torch.nn.Module, front_prefixes: list[str]
) -> None:
    """Each stage holds only its own parameters, equal to the model's, and none twice."""
    full = _tensors(module)
    front, back = pair.front.state_dict, pair.back.state_dict
    assert front and back
    assert not set(front) & set(back)
    assert set(front) | set(back) <= set(full)
    for name in front:
        assert any(name.startswith(prefix + ".") for prefix in front_prefixes), name
    for name in back:
        assert not any(name.startswith(prefix + ".") for prefix in front_prefixes), name
    for name, value in (front | back).items():
        torch.testing.assert_close(value, full[name], rtol=0, atol=0)


def assert_no_example_inputs(pair: StagePair) -> None:
    assert pair.front.example_inputs is None
    assert pair.back.example_inputs is None


# --- digits CNN ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_spec() -> ModelSpec:
    torch.manual_seed(11)
    module = DigitsCNN().eval()
    return ModelSpec(
        module=module,
        example_inputs={"image": torch.rand(4, 1, 8, 8)},
        labels=digits.LABELS,
        max_sizes={"batch": 1024},
    )


@pytest.fixture(scope="module")
def digits_program(digits_spec: ModelSpec) -> ExportedProgram:
    return export_model(digits_spec)


@pytest.mark.parametrize(
    ("split", "front_prefixes"),
    [
        (digits.SPLIT, ["features.0"]),
        ("features.4", ["features.0", "features.2"]),
        ("classifier.2", ["features", "classifier.1"]),
    ],
)
def test_digits_front_then_back_equals_unsplit(
    digits_spec: ModelSpec,
    digits_program: ExportedProgram,
    split: str,
    front_prefixes: list[str],
) -> None:
    pair = split_program(digits_program, split)
    assert pair.request_inputs == ["image"]
    for batch in (1, 3, 17, 1024):
        image = torch.rand(batch, 1, 8, 8, generator=torch.Generator().manual_seed(batch))
        expected = unsplit(digits_spec, {"image": image})
        torch.testing.assert_close(run_pair(pair, {"image": image}), expected, rtol=0, atol=ATOL)
    assert_parameters_split(pair, digits_spec.module, front_prefixes)
    assert_no_example_inputs(pair)
    assert {name for name, _low, _high in pair.front_dims.values()} == {"batch"}
    assert {name for name, _low, _high in pair.back_dims.values()} == {"batch"}


@pytest.mark.parametrize("split", ["classifier", "classifier.3", "nope", "features.9"])
def test_digits_bad_split_points(digits_program: ExportedProgram, split: str) -> None:
    with pytest.raises(SplitError):
        split_program(digits_program, split)


# --- nested model with a residual block ----------------------------------------------------


@pytest.fixture(scope="module")
def nested() -> ModelSpec:
    return nested_spec()


@pytest.fixture(scope="module")
def nested_program(nested: ModelSpec) -> ExportedProgram:
    return export_model(nested)


@pytest.mark.parametrize("split", list(NESTED_SPLITS))
def test_nested_front_then_back_equals_unsplit(
    nested: ModelSpec, nested_program: ExportedProgram, split: str
) -> None:
    pair = split_program(nested_program, split, nested.dynamic_dims)
    generator = torch.Generator().manual_seed(5)
    for batch, tokens in ((1, 1), (5, 9), (2, 32), (64, 3)):
        x = torch.randn(batch, tokens, 12, generator=generator)
        expected = unsplit(nested, {"tokens": x})
        torch.testing.assert_close(run_pair(pair, {"tokens": x}), expected, rtol=0, atol=ATOL)
    assert_parameters_split(pair, nested.module, NESTED_SPLITS[split])
    assert_no_example_inputs(pair)
    names = {name for name, _low, _high in pair.back_dims.values()}
    assert names <= {"batch", "tokens"}
    assert all(not b.source.startswith("request:") for b in pair.back_inputs)


def test_split_inside_a_residual_block_sends_the_skip_path(
    nested: ModelSpec, nested_program: ExportedProgram
) -> None:
    pair = split_program(nested_program, "encoder.blocks.1.mlp.0", nested.dynamic_dims)
    assert len(pair.front_outputs) == 2  # the block's input (skip) and mlp.0's output
    shapes = sorted(tuple(val.shape[-1:]) for val in user_input_vals(pair.back))
    assert shapes == [(24,), (48,)]
    nested_once = split_program(nested_program, "encoder.blocks.0", nested.dynamic_dims)
    assert len(nested_once.front_outputs) == 1


@pytest.mark.parametrize(
    ("split", "match"),
    [
        ("head", "computes the model's output"),
        ("encoder.blocks.7", "no submodule 'encoder.blocks.7'; did you mean 'encoder.blocks.2'"),
        ("nope", "no submodule 'nope'"),
        ("encoder.blocks.1.mlp.9", "did you mean 'encoder.blocks.1.mlp.2'"),
    ],
)
def test_nested_bad_split_points(nested_program: ExportedProgram, split: str, match: str) -> None:
    with pytest.raises(SplitError, match=match):
        split_program(nested_program, split)


def test_split_error_is_a_value_error() -> None:
    assert issubclass(SplitError, ValueError)


# --- MiniLM --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm_pair(minilm_spec: ModelSpec) -> StagePair:
    return split_program(export_model(minilm_spec), minilm.SPLIT, minilm_spec.dynamic_dims)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("count", "length"), [(1, None), (3, 37), (2, 128)], ids=["1x-longest", "3x37", "2x128"]
)
def test_minilm_front_then_back_equals_unsplit(
    minilm_spec: ModelSpec, minilm_pair: StagePair, count: int, length: int | None
) -> None:
    inputs = minilm.tokenize(minilm.SENTENCES[:count], length=length)
    example = minilm_spec.example_inputs["input_ids"].shape
    assert inputs["input_ids"].shape != example
    if length is not None:
        assert inputs["input_ids"].shape == (count, length)
    expected = unsplit(minilm_spec, inputs)
    torch.testing.assert_close(run_pair(minilm_pair, inputs), expected, rtol=0, atol=ATOL)


@pytest.mark.slow
def test_minilm_back_stage_takes_hidden_states_and_the_2d_mask(minilm_pair: StagePair) -> None:
    assert minilm_pair.request_inputs == ["input_ids", "attention_mask"]
    sources = [b.source for b in minilm_pair.back_inputs]
    assert sources == [f"front:{name}" for name in minilm_pair.front_outputs] + [
        "request:attention_mask"
    ]
    vals = user_input_vals(minilm_pair.back)
    assert len(vals) == len(sources)
    assert [v.dim() for v in vals] == [3] * len(minilm_pair.front_outputs) + [2]
    assert all(v.dtype == torch.float32 and v.shape[-1] == 384 for v in vals[:-1])
    assert vals[-1].dtype == torch.int64
    assert not any(v.dim() == 4 for v in vals)  # the broadcast mask is rebuilt, never sent
    dim_names = {name for name, _low, _high in minilm_pair.back_dims.values()}
    assert dim_names == {"batch", "seq"}
    assert ("seq", 1, minilm.MAX_SEQUENCE) in minilm_pair.back_dims.values()


@pytest.mark.slow
def test_minilm_stages_hold_only_their_own_weights(
    minilm_spec: ModelSpec, minilm_pair: StagePair
) -> None:
    front, back = minilm_pair.front.state_dict, minilm_pair.back.state_dict
    late_layer = re.compile(r"encoder\.layer\.([2-9]|\d\d+)\.")
    early = re.compile(r"(embeddings\.|encoder\.layer\.[01]\.)")
    assert not set(front) & set(back)
    assert not [name for name in front if late_layer.search(name)]
    assert not [name for name in back if early.search(name)]
    assert any("encoder.layer.1." in name for name in front)
    assert any("encoder.layer.5." in name for name in back)
    assert any("embeddings.word_embeddings" in name for name in front)
    full = _tensors(minilm_spec.module)
    assert set(front) | set(back) <= set(full)
    assert_no_example_inputs(minilm_pair)
