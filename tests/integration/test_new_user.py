"""A new user's own models, from ``mymodels.py`` in a folder of theirs: ``init``, ``pack`` as
README shows it, both tiers as real processes, and answers equal to the unsplit models'."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from splitvault_client import Client

from shared.layout import DeployLayout
from splitvault.launcher import start_both
from tests.conftest import issue_key
from tests.support import user_models
from tests.support.new_user import LABELS, splitvault, user_folder
from tests.support.stack import tier_env

pytestmark = pytest.mark.slow

# name -> (pack arguments, the factory that builds the original)
PACKS: dict[str, tuple[list[str], Callable[[], Any]]] = {
    "mlp": (
        ["--factory", "mymodels:make_mlp", "--split", "fc1", "--labels", "labels.txt"],
        user_models.make_mlp,
    ),
    "mlp-one": (
        ["--factory", "./mymodels.py:make_mlp_one", "--split", "fc1"],
        user_models.make_mlp,
    ),
    "cnn": (["--factory", "mymodels:make_cnn", "--split", "features.body.0"], user_models.make_cnn),
    "two-inputs": (
        ["--factory", "mymodels:make_two_inputs", "--split", "image_net"],
        user_models.make_two_inputs,
    ),
    "train-mode": (
        ["--factory", "mymodels:make_train_mode", "--split", "body"],
        user_models.make_train_mode,
    ),
    "program": (
        ["--program", "mlp.pt2", "--split", "fc1", "--labels", "labels.txt"],
        user_models.make_mlp,
    ),
}


@dataclass
class Walk:
    """The user's folder, what each ``pack`` printed, and both tiers serving the result."""

    folder: Path
    packed: dict[str, subprocess.CompletedProcess[str]]
    url: str
    api_key: str
    ca: Path

    def client(self) -> Client:
        return Client(self.url, api_key=self.api_key, ca=self.ca)


def _export_mlp(path: Path) -> None:
    """What a user who exports the model themselves writes (dynamic batch)."""
    module, example = user_models.make_mlp()
    batch = torch.export.Dim("batch", max=1024)
    program = torch.export.export(module, (example,), dynamic_shapes=({0: batch},))
    torch.export.save(program, path)


@pytest.fixture(scope="module")
def walk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Walk]:
    folder = user_folder(tmp_path_factory.mktemp("new-user") / "project")
    created = splitvault(folder, "init", "deploy")
    assert created.returncode == 0, created.stderr
    _export_mlp(folder / "mlp.pt2")
    packed = {}
    for name, (arguments, _factory) in PACKS.items():
        common = ["--name", name, "--deploy", "deploy", "--transport", "FP32", "--quiet"]
        packed[name] = splitvault(folder, "pack", *common, *arguments)
        # Answers are compared with the unsplit model: watermark off (it is on by default).
        splitvault(folder, "watermark", "disable", "--deploy", "deploy", "--model", name)
    layout = DeployLayout(folder / "deploy")
    with ExitStack() as stack:
        public, _private = start_both(layout.root, stack, env=tier_env())
        url = f"https://localhost:{public.port}"
        yield Walk(folder, packed, url, issue_key(layout, "new-user"), layout.public.ca_cert)


def _original_top3(factory: Callable[[], Any], inputs: dict[str, np.ndarray]) -> tuple[Any, Any]:
    module, _example = factory()
    module.eval()
    with torch.inference_mode():
        logits = module(**{k: torch.from_numpy(v) for k, v in inputs.items()}).double()
    scores, indices = torch.topk(torch.softmax(logits, dim=-1), 3, dim=-1)
    return indices.numpy(), scores.numpy()


def _inputs(name: str, rows: int) -> dict[str, np.ndarray]:
    generator = np.random.default_rng(rows)
    per_model: dict[str, dict[str, tuple[int, ...]]] = {
        "cnn": {"image": (rows, 1, 12, 12)},
        "two-inputs": {"image": (rows, 3, 8, 8), "extra": (rows, 4)},
        "train-mode": {"x": (rows, 16)},
    }
    shapes = per_model.get(name, {"x": (rows, 64)})
    return {k: generator.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


@pytest.mark.parametrize("name", list(PACKS))
def test_each_model_packs(walk: Walk, name: str) -> None:
    done = walk.packed[name]
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"packed {name!r} split after "), done.stdout
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("name", list(PACKS))
@pytest.mark.parametrize("rows", [1, 5])
def test_each_model_answers_like_the_original(walk: Walk, name: str, rows: int) -> None:
    inputs = _inputs(name, rows)
    expected_indices, expected_scores = _original_top3(PACKS[name][1], inputs)
    with walk.client() as client:
        prediction = client.predict(name, inputs)
    assert prediction.scores is not None
    np.testing.assert_array_equal(prediction.indices, expected_indices)
    # FP32 activations, scores rounded to 4 decimals.
    np.testing.assert_allclose(prediction.scores, expected_scores, atol=6e-5)


@pytest.mark.parametrize("name", ["mlp", "program"])
def test_labels_file_is_read_one_label_per_line(walk: Walk, name: str) -> None:
    with walk.client() as client:
        prediction = client.predict(name, _inputs(name, 2)["x"])
    assert prediction.labels is not None and prediction.indices is not None
    assert prediction.labels == [[LABELS[i] for i in row] for row in prediction.indices.tolist()]


def test_a_model_left_in_training_mode_is_packed_in_eval_mode_with_a_warning(walk: Walk) -> None:
    assert walk.packed["train-mode"].stderr == (
        "splitvault: warning: the factory returned the model in training mode; "
        "it is packed in eval mode\n"
    )


def test_the_batch_one_example_and_the_path_form_pack_without_a_word(walk: Walk) -> None:
    assert walk.packed["mlp-one"].stderr == ""
    assert walk.packed["mlp"].stderr == ""
