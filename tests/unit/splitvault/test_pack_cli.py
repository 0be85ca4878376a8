"""``splitvault pack`` and friends as a new user meets them: each failure is the documented
three-line message (what, cause, fix), the traceback only with ``--verbose``."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from splitvault.cli import main
from splitvault.deploy import init_deployment
from tests.support import user_models
from tests.support.new_user import user_folder


@dataclass(frozen=True)
class Run:
    status: int
    out: str
    err: str


@pytest.fixture(scope="module")
def deploy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return init_deployment(tmp_path_factory.mktemp("deploy") / "d").root


@pytest.fixture
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The user's folder as the current one; the import path and modules restored after."""
    work = user_folder(tmp_path / "project")
    monkeypatch.chdir(work)
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield work
    for name in [n for n in sys.modules if n == "mymodels" or n.startswith("_splitvault_")]:
        del sys.modules[name]


Cli = Callable[..., Run]


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Cli:
    def run(*args: str) -> Run:
        status = main(list(args))
        captured = capsys.readouterr()
        return Run(status, captured.out, captured.err)

    return run


def pack(cli: Cli, deploy: Path, *args: str) -> Run:
    return cli("pack", "--name", "m", "--deploy", str(deploy), "--quiet", *args)


def _line_of(text: str) -> int:
    source = Path(user_models.__file__).read_text("utf-8").splitlines()
    return next(i for i, line in enumerate(source, 1) if text in line)


def test_a_factory_module_not_in_the_folder(cli, deploy, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    run = pack(cli, deploy, "--factory", "mymodels:make_mlp", "--split", "fc1")
    assert run.status == 2
    assert run.err.splitlines() == [
        "splitvault: error: cannot import the factory module 'mymodels'",
        f"  cause: no mymodels.py or mymodels/ in {tmp_path} or on the Python path",
        "  fix: run in the folder holding mymodels.py, or pass --factory "
        "path/to/mymodels.py:FUNCTION",
    ]


def test_a_missing_factory_function_suggests_the_nearest(cli, deploy, folder):
    run = pack(cli, deploy, "--factory", "mymodels.py:make_mpl", "--split", "fc1")
    lines = run.err.splitlines()
    assert lines[0] == "splitvault: error: mymodels.py has no function 'make_mpl'"
    assert lines[1].startswith("  cause: its functions are make_mlp, make_mlp_one, make_cnn")
    assert lines[2] == "  fix: --factory mymodels.py:make_mlp"
    assert len(lines) == 3


def test_data_dependent_control_flow(cli, deploy, folder):
    run = pack(cli, deploy, "--factory", "mymodels:make_branchy", "--split", "fc1")
    assert run.status == 2
    assert run.err.splitlines() == [
        "splitvault: error: the model's control flow depends on tensor values at "
        f"mymodels.py:{_line_of('if h.sum() > 0:')} `if h.sum() > 0:`",
        "  cause: torch.export traces one path and cannot branch on a value it does not know",
        "  fix: write the branch with torch.cond or torch.where, or export it yourself and pass "
        "--program model.pt2",
    ]
    assert run.out == ""


def test_a_batch_fixed_in_the_code(cli, deploy, folder):
    run = pack(cli, deploy, "--factory", "mymodels:make_fixed_batch", "--split", "fc1")
    assert run.err.splitlines() == [
        "splitvault: error: the model fixes the size of dimension 'batch' to 4",
        "  cause: splitvault serves any batch size, but the code assumes one (a reshape or a "
        "loop over a fixed size)",
        "  fix: use x.shape[0] or -1 instead of a constant batch size in forward()",
    ]


def test_a_submodule_named_meta(cli, deploy, folder):
    run = pack(cli, deploy, "--factory", "mymodels:make_meta", "--split", "meta")
    assert run.err.splitlines() == [
        "splitvault: error: the model has a top-level submodule named 'meta', which "
        "torch.export cannot rebuild",
        "  cause: torch's graph module has an attribute 'meta' of its own (a torch bug)",
        "  fix: rename that submodule (e.g. self.meta_net) and its state_dict keys to match",
    ]


def test_a_factory_returning_the_module_alone(cli, deploy, folder):
    run = pack(cli, deploy, "--factory", "mymodels:make_module_only", "--split", "fc1")
    assert run.err.splitlines() == [
        "splitvault: error: the factory mymodels:make_module_only returned a MLP",
        "  cause: splitvault needs the model and an example input to trace it with",
        "  fix: return (module, example_tensor), (module, {input_name: tensor}) or a ModelSpec",
    ]


def test_a_split_typo_says_the_nearest_name(cli, deploy, folder):
    run = pack(cli, deploy, "--factory", "mymodels:make_mlp", "--split", "fc_2")
    assert run.err.splitlines() == [
        "splitvault: error: the model has no submodule 'fc_2'; did you mean 'fc2'?",
        "  cause: its submodules are fc1, fc2, fc3",
        "  fix: `splitvault inspect` lists the split points with the share each keeps private",
    ]


def test_too_little_private_is_refused_unless_forced(cli, deploy, folder):
    refused = pack(cli, deploy, "--factory", "mymodels:make_mlp", "--split", "fc2")
    assert refused.status == 2
    assert refused.err.splitlines() == [
        "splitvault: error: a split after 'fc2' keeps only 4.9% of the parameters private",
        "  cause: the floor is 10%: the rest would sit on the internet-facing host",
        "  fix: split at an earlier submodule (`splitvault inspect` lists the shares), or --force",
    ]
    assert not (deploy / "public" / "models" / "m").exists()
    forced = pack(cli, deploy, "--factory", "mymodels:make_mlp", "--split", "fc2", "--force")
    assert forced.status == 0
    assert forced.err == (
        "splitvault: warning: only 4.9% of the parameters are private (below 50%); "
        "`splitvault inspect` lists earlier split points\n"
    )


def test_labels_must_match_the_classes(cli, deploy, folder):
    (folder / "three.txt").write_text("cat\ndog\nsea lion\n", encoding="utf-8")
    run = pack(
        cli, deploy, "--factory", "mymodels:make_mlp", "--split", "fc1", "--labels", "three.txt"
    )
    assert run.err.splitlines() == [
        "splitvault: error: 3 labels given for 10 classes",
        "  cause: the model's output has 10 classes (its last dimension)",
        "  fix: give exactly 10 labels, one per line, in class-index order",
    ]


def test_a_blank_label_line_is_refused(cli, deploy, folder):
    (folder / "gap.txt").write_text("cat\n\ndog\n\n", encoding="utf-8")
    run = pack(
        cli, deploy, "--factory", "mymodels:make_mlp", "--split", "fc1", "--labels", "gap.txt"
    )
    assert run.err.splitlines() == [
        "splitvault: error: --labels 'gap.txt': line 2 is blank",
        "  cause: each line is the label of one class, in class-index order",
        "  fix: write one non-empty label per line",
    ]


def test_not_a_deployment_folder(cli, folder):
    run = cli(
        "pack", "--name", "m", "--deploy", "nodeploy", "--factory", "mymodels:make_mlp",
        "--split", "fc1",
    )  # fmt: skip
    assert run.err.splitlines() == [
        "splitvault: error: --deploy 'nodeploy' does not exist",
        "  cause: no nodeploy/secrets/kek (written by `splitvault init`)",
        "  fix: run `splitvault init nodeploy` first, or pass the folder init created",
    ]


def test_an_invalid_name_is_one_fix_not_a_pydantic_dump(cli, deploy, folder):
    run = cli(
        "pack", "--name", "My Model", "--deploy", str(deploy), "--factory", "mymodels:make_mlp",
        "--split", "fc1",
    )  # fmt: skip
    assert run.err.splitlines() == [
        "splitvault: error: invalid model name 'My Model'",
        "  cause: a name is 1-64 of a-z 0-9 _ . - starting with a letter or digit (a folder, a URL)",
        "  fix: --name my-model",
    ]


def test_serve_public_without_the_private_address(cli, deploy):
    run = cli("serve", "public", "--deploy", str(deploy))
    assert run.status == 2
    assert run.err.splitlines() == [
        "splitvault: error: the public tier needs the private tier's address",
        "  cause: private_addresses is not set",
        "  fix: --private HOST:PORT (repeat for replicas), or private_addresses in public.toml",
    ]


def test_serve_private_from_a_folder_without_its_tier(cli, tmp_path):
    run = cli("serve", "private", "--deploy", str(tmp_path))
    assert run.err.splitlines() == [
        f"splitvault: error: --deploy '{tmp_path}' has no private tier folder",
        f"  cause: no {tmp_path}/private (made by `splitvault init`, copied to the private host)",
        f"  fix: run `splitvault init {tmp_path}` first, or pass the folder holding private/",
    ]


def test_verbose_adds_the_traceback(cli, deploy, folder):
    args = ["--factory", "mymodels:make_module_only", "--split", "fc1"]
    quiet = pack(cli, deploy, *args)
    loud = pack(cli, deploy, *args, "--verbose")
    assert "Traceback" not in quiet.err
    assert loud.err.startswith("Traceback (most recent call last):")
    assert loud.err.endswith(quiet.err)


def test_a_program_with_a_fixed_batch_packs_with_a_warning(cli, deploy, folder):
    module, example = user_models.make_mlp()
    torch.export.save(torch.export.export(module, (example,)), folder / "fixed.pt2")
    run = cli(
        "pack", "--name", "fixed", "--deploy", str(deploy), "--program", "fixed.pt2",
        "--split", "fc1", "--quiet",
    )  # fmt: skip
    assert run.status == 0
    assert run.err == (
        "splitvault: warning: input 'x' has a fixed batch of 4: only requests of exactly 4 rows "
        "will be answered; export with dynamic_shapes={'x': {0: Dim('batch')}}\n"
    )
