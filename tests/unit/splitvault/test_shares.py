"""``splitvault inspect``: split candidates with parameter and FLOP shares, the factory forms and
the batch-1 example."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from shared.keys import LocalFileKeyProvider
from shared.manifest import TopKPolicy
from splitvault.cli import main
from splitvault.deploy import init_deployment
from splitvault.packing.factory import load_factory
from splitvault.packing.pack import pack_spec
from splitvault.packing.shares import node_flops, split_candidates
from splitvault.packing.spec import spec_from_factory_result
from splitvault.packing.split import export_model, flatten
from tests.support import user_models

MLP_FLOPS = 2 * (64 * 128 + 128 * 128 + 128 * 10)  # per sample: one multiply-add per weight


def test_inspect_lists_the_mlp_split_points(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "--factory", "tests.support.user_models:make_mlp"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "split points of tests.support.user_models:make_mlp (`pack --split NAME`), in execution "
        "order:",
        "  split  crosses      public params   private params  private FLOPs",
        "  fc1    batch x 128  8,320 (31.9%)   17,802 (68.1%)  68.3%",
        "  fc2    batch x 128  24,832 (95.1%)  1,290 (4.9%)    5.0%           refused (needs --force)",
        "pack warns below 50% of the parameters private and refuses below 10% unless --force",
    ]


def test_nested_names_and_equivalent_cuts_share_a_row(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "--factory", "tests.support.user_models:make_cnn"]) == 0
    rows = [line.split()[0] for line in capsys.readouterr().out.splitlines()[2:-1]]
    assert rows == [
        "features.stem",
        "features.body.0",
        "features.body",
        "features",
        "head.0",
        "head.1",
    ]


def test_all_adds_the_cuts_where_a_skip_path_crosses(capsys: pytest.CaptureFixture[str]) -> None:
    factory = "tests.support.models:nested_factory"
    assert main(["inspect", "--factory", factory]) == 0
    main_path = capsys.readouterr().out
    assert main(["inspect", "--factory", factory, "--all"]) == 0
    everything = capsys.readouterr().out
    assert " encoder.blocks.1 " in main_path and " encoder.blocks.1 " in everything
    assert "encoder.blocks.1.mlp.0" not in main_path
    assert "(9 more where several tensors cross, a skip path or a branch: --all)" in main_path
    assert (
        "  encoder.blocks.1.mlp.0 (= encoder.blocks.1.mlp.1)  batch x 6 x 24 + batch x 6 x 48"
        in everything
    )


def test_shares_agree_with_what_pack_writes(tmp_path: Path) -> None:
    spec = spec_from_factory_result(user_models.make_cnn())
    (candidate,) = [c for c in split_candidates(export_model(spec)) if c.split == "features.body.0"]
    layout = init_deployment(tmp_path / "d")
    result = pack_spec(
        spec,
        name="cnn",
        split="features.body.0",
        layout=layout,
        provider=LocalFileKeyProvider.load(layout.kek),
        policy=TopKPolicy(),
        show_progress=False,
    )
    assert candidate.shares.public_parameters == result.public.parameters
    assert candidate.shares.private_parameters == result.private.parameters


def test_flops_are_counted_node_by_node() -> None:
    program = export_model(spec_from_factory_result(user_models.make_mlp()))
    gm, _placeholders, _compute = flatten(program)
    args, kwargs = program.example_inputs
    flops = node_flops(gm, [*args, *kwargs.values()])
    assert sum(flops.values()) == 4 * MLP_FLOPS
    (fc1, fc2) = split_candidates(program)
    assert fc1.shares.public_flops == 4 * 2 * 64 * 128
    assert fc1.shares.private_flops == 4 * 2 * (128 * 128 + 128 * 10)
    assert fc2.shares.private_flops == 4 * 2 * 128 * 10


def test_a_batch_one_example_exports_a_dynamic_batch() -> None:
    program = export_model(spec_from_factory_result(user_models.make_mlp_one()))
    (x,) = [n for n in program.graph.nodes if n.op == "placeholder" and n.name == "x"]
    assert isinstance(x.meta["val"].shape[0], torch.SymInt)
    _args, kwargs = program.example_inputs
    assert kwargs["x"].shape == (2, 64)


def test_a_tuple_example_binds_forward_parameters_in_order() -> None:
    spec = spec_from_factory_result(user_models.make_two_inputs())
    assert list(spec.example_inputs) == ["image", "extra"]
    assert spec.example_inputs["extra"].shape == (2, 4)


def test_a_factory_file_named_like_a_loaded_module(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``path/json.py:make_mlp`` loads that file, and leaves the standard ``json`` alone."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    shutil.copy(user_models.__file__, tmp_path / "json.py")
    try:
        spec = load_factory(f"{tmp_path}/json.py:make_mlp")
    finally:
        sys.modules.pop("_splitvault_factory_json", None)
    assert type(spec.module).__name__ == "MLP"
    assert sys.modules["json"] is json
