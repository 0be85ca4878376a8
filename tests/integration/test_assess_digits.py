"""``splitvault assess`` and ``pack --assess-data`` on the digits demo, with a real encrypted
deployment and tiny budgets (seconds)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from shared.keys import LocalFileKeyProvider
from shared.layout import DeployLayout
from shared.manifest import LabelPolicy
from splitvault.assess.experiment import Settings
from splitvault.assess.run import Request, run_assessment
from splitvault.assess.thieves import Training
from splitvault.cli import main
from splitvault.demo import digits
from splitvault.deploy import init_deployment
from splitvault.packing.pack import pack_spec
from tests.conftest import DigitsFixture

TINY = ["--budgets", "30,120", "--seeds", "2", "--steps", "60", "--quiet"]
ROW = re.compile(
    r"^\s+(\d+) \| +([\d.]+) ± ([\d.]+) \| +([\d.]+) ± ([\d.]+) \| +([+-][\d.]+) \| +([+-][\d.]+)$"
)
CHANCE = 0.1  # ten classes


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models train faster on one thread than on cores other work keeps busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory, digits_model: DigitsFixture) -> DeployLayout:
    layout = init_deployment(tmp_path_factory.mktemp("assess") / "d")
    pack_spec(
        digits_model.spec,
        name="digits",
        split=digits.SPLIT,
        layout=layout,
        provider=LocalFileKeyProvider.load(layout.kek),
        policy=LabelPolicy(),
        show_progress=False,
    )
    return layout


def test_assess_prints_both_curves_the_shares_and_a_verdict(
    layout: DeployLayout, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["assess", "--model", "digits", "--deploy", str(layout.root), "--data", "demo"]
    assert main([*args, *TINY]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("assess 'digits' (classification; label-only thieves; 1,797")
    assert re.match(
        r"split after 'features\.1': private tier holds \d+\.\d% of parameters .* "
        r"and \d+\.\d% of FLOPs",
        lines[1],
    )
    rows = [ROW.match(line) for line in lines[3:5]]
    assert all(rows), lines
    for row in rows:
        assert row is not None
        front_known, black_box = float(row[2]), float(row[4])
        assert 0.0 <= black_box <= 1.0 and 0.0 <= front_known <= 1.0
        assert front_known > 3 * CHANCE  # the front-known thief really learned the model
        gap_mean, gap_upper = float(row[6]), float(row[7])
        assert gap_upper >= gap_mean
    assert [int(row[1]) for row in rows if row] == [30, 120]
    assert re.match(r"verdict: (PASS|FAIL): .*over 2 seeds\)$", lines[5])


def test_candidates_recommend_the_cheapest_passing_split(
    capsys: pytest.CaptureFixture[str],
) -> None:
    candidates = "features.1,features.4,classifier.3"
    args = ["assess", "--factory", "splitvault.demo.digits:factory", "--data", "demo"]
    assert main([*args, "--candidates", candidates, "--margin", "100", *TINY]) == 0
    out = capsys.readouterr().out
    assert "split after 'classifier.3': not assessed: submodule 'classifier.3' computes" in out
    assert out.count("verdict: PASS") == 2  # a 100-point margin lets every real split pass
    # features.4 (after the pooling) leaves the least compute private.
    assert out.splitlines()[-1].startswith("recommendation: split after 'features.4'")


def test_candidates_say_plainly_when_none_passes(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["assess", "--factory", "splitvault.demo.digits:factory", "--data", "demo"]
    # A negative margin: even a thief no better than black-box fails, so nothing can pass.
    assert main([*args, "--candidates", "features.4", "--margin=-100", *TINY]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.startswith("recommendation: none: no candidate passes.")


def test_thieves_starting_from_public_weights_copy_the_model(layout: DeployLayout) -> None:
    """With the model's own weights as the "public" start, the black-box thief is the model."""
    request = Request(
        data="demo",
        model="digits",
        factory="splitvault.demo.digits:factory",
        candidates=[digits.SPLIT],
        public_init="splitvault.demo.digits:factory",
        settings=Settings(budgets=[30], seeds=2, training=Training(steps=5, learning_rate=1e-5)),
        show_progress=False,
    )
    (assessment,) = run_assessment(request).assessments
    assert min(assessment.results[0].black_box) > 0.95


def test_pack_prints_one_assess_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    deploy = init_deployment(tmp_path / "d").root
    args = ["pack", "--name", "digits", "--split", digits.SPLIT, "--deploy", str(deploy)]
    factory = ["--factory", "splitvault.demo.digits:factory", "--policy", "label"]
    tiny = ["--assess-budgets", "30", "--assess-seeds", "2", "--assess-steps", "40"]
    assert main([*args, *factory, "--assess-data", "demo", *tiny, "--quiet"]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert re.match(
        r"assess: (PASS|FAIL): holding the front gains a thief at most [+-]\d+\.\d points .*"
        r"budgets 30, 2 seeds\); private tier holds \d+\.\d% of parameters, \d+\.\d% of FLOPs$",
        last,
    )


def test_embedders_are_measured_by_mean_cosine(tmp_path: Path) -> None:
    """A small token model read as an embedder: thieves learn its output vectors."""
    tokens = torch.randn(240, 6, 12, generator=torch.Generator().manual_seed(3))
    data = tmp_path / "tokens.npz"
    np.savez(data, tokens=tokens.numpy())
    request = Request(
        data=str(data),
        factory="tests.support.models:nested_spec",
        task="embedding",
        candidates=["encoder.blocks.0"],
        settings=Settings(budgets=[100], seeds=2, training=Training(steps=80)),
        show_progress=False,
    )
    outcome = run_assessment(request)
    assert "embedding thieves; 240 natural inputs, 60 held out" in outcome.lines[0]
    (result,) = outcome.assessments[0].results
    for cosine in [*result.front_known, *result.black_box]:
        assert -1.0 <= cosine <= 1.0
    assert min(result.front_known) > 0.5, result
