"""Ownership proof end to end: watermarked answers through both tiers, the verifier, evidence."""

from __future__ import annotations

import base64
import json
import shutil
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from splitvault_client import Client
from torch import nn

from private_core.model_store import ModelLoadFailure, load_back_stage
from private_core.watermark.keys import CHOICE_FILE, WATERMARK_KEY_FILE, load_key
from private_core.watermark.triggers import TriggerRecord, read_triggers
from public_api.keys import parse_key_id
from shared.keys import LocalFileKeyProvider
from shared.layout import DeployLayout
from shared.manifest import LabelPolicy, WatermarkConfig, read_config
from splitvault.cli import main
from splitvault.demo import digits
from splitvault.deploy import init_deployment
from splitvault.ownership.owner import OwnerModel
from splitvault.packing.pack import pack_spec
from tests.conftest import Deployment, DigitsFixture, issue_key
from tests.support.processes import start_private, start_public
from tests.support.stack import tier_env

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class Owned:
    """A deployment whose digits model watermarks labels, and what one API key got from it."""

    layout: DeployLayout
    key_id: str
    images: np.ndarray
    answers: np.ndarray
    request_ids: list[str]
    suspects: Path  # folder with inputs.npy, copy.pt2 (trained on the answers), independent.pt


def _train(images: np.ndarray, labels: np.ndarray, epochs: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = digits.DigitsCNN()
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    for _ in range(epochs):
        for batch in torch.split(torch.randperm(len(x)), 32):
            optimiser.zero_grad()
            loss: torch.Tensor = nn.functional.cross_entropy(model(x[batch]), y[batch])
            loss.backward()  # type: ignore[no-untyped-call]
            optimiser.step()
    return model.eval()


def _suspects(folder: Path, images: np.ndarray, answers: np.ndarray) -> Path:
    """A copy trained on the API's answers (.pt2) and an independent model (TorchScript)."""
    folder.mkdir()
    np.save(folder / "inputs.npy", images)
    copy = _train(images, answers, epochs=80, seed=1)
    batch = torch.export.Dim("batch", min=1, max=1024)
    example = (torch.from_numpy(images[:4]),)
    program = torch.export.export(copy, example, dynamic_shapes={"image": {0: batch}})
    torch.export.save(program, folder / "copy.pt2")
    other = digits.load_data(seed=7)
    independent = _train(other.train_x, other.train_y, epochs=10, seed=2)
    traced = torch.jit.trace(independent, example)  # type: ignore[no-untyped-call]
    traced.save(str(folder / "independent.pt"))
    return folder


@pytest.fixture(scope="module")
def owned(tmp_path_factory: pytest.TempPathFactory, digits_model: DigitsFixture) -> Owned:
    """Pack with a 5% label watermark on every query, serve, let one key query 450 digits."""
    root = tmp_path_factory.mktemp("ownership")
    layout = init_deployment(root / "d")
    pack_spec(
        digits_model.spec,
        name="digits",
        split=digits.SPLIT,
        layout=layout,
        provider=LocalFileKeyProvider.load(layout.kek),
        policy=LabelPolicy(),
        show_progress=False,
        watermark=WatermarkConfig(
            enabled=True, marks="query", scheme="label", fraction=0.05, max_confidence=1
        ),
    )
    secret = issue_key(layout, "suspect-maker")
    images = digits_model.data.test_x
    private = start_private(layout.root, env=tier_env())
    try:
        public = start_public(layout.root, private.port, env=tier_env())
        try:
            url = f"https://localhost:{public.port}"
            with Client(url, api_key=secret, ca=layout.public.ca_cert) as client:
                ids = [f"q-{start}" for start in range(0, len(images), 64)]
                answers = [
                    client.predict("digits", images[start : start + 64], request_id=rid).indices
                    for start, rid in zip(range(0, len(images), 64), ids, strict=True)
                ]
                again = client.predict("digits", images[:64]).indices
        finally:
            public.stop()
    finally:
        private.stop()
    labels = np.concatenate([a[:, 0] for a in answers if a is not None])
    assert again is not None
    np.testing.assert_array_equal(again[:, 0], labels[:64])  # same query, same answer
    key_id = parse_key_id(secret)
    assert key_id is not None
    suspects = _suspects(root / "suspects", images, labels)
    return Owned(layout, key_id, images, labels, ids, suspects)


def _forms(secret: bytes) -> list[bytes]:
    return [secret, secret.hex().encode(), base64.b64encode(secret), base64.b64encode(secret)[:40]]


def test_watermark_key_is_absent_from_every_public_file(deployment: Deployment) -> None:
    layout = deployment.layout
    keys = [
        load_key(folder / WATERMARK_KEY_FILE, deployment.provider)
        for folder in sorted(layout.private.models.iterdir())
        if (folder / WATERMARK_KEY_FILE).exists()
    ]
    assert len(keys) == 3  # every classifier got a key at pack time
    public_files = [p for p in layout.public.root.rglob("*") if p.is_file()]
    assert public_files
    for path in public_files:
        data = path.read_bytes()
        assert WATERMARK_KEY_FILE.encode() not in data
        for key in keys:
            for form in _forms(key.secret):
                assert form not in data, f"{path} holds the watermark key"
    for folder in layout.private.models.iterdir():
        for form in _forms(keys[0].secret):
            assert all(form not in f.read_bytes() for f in folder.iterdir())


def test_public_config_does_not_say_how_answers_are_marked(owned: Owned) -> None:
    assert read_config(owned.layout.public.model("digits")).watermark is None
    private = read_config(owned.layout.private.model("digits")).watermark
    assert private is not None and private.enabled and private.fraction == 0.05


def test_watermarked_answers_are_kept_encrypted_with_who_asked(owned: Owned) -> None:
    owner = OwnerModel(owned.layout.root, "digits")
    records: list[TriggerRecord] = list(read_triggers(owner.trigger_dir, "digits", owner.key))
    model_labels = owner.probabilities(owner.back_inputs({"image": owned.images})).argmax(axis=1)
    differs = np.flatnonzero(owned.answers != model_labels)
    assert 10 <= len(differs) <= 45  # 5% of 450 queries
    first_ids = {r.query_id for r in records}
    assert len(first_ids) == len(records) == len(differs)  # one record per (key, query)
    first_batch = owner.marker().query_ids(owner.back_inputs({"image": owned.images[:64]}))
    twice = {qid.hex() for qid in first_batch}  # the first 64 queries were asked again
    assert [r.count for r in records] == [2 if r.query_id in twice else 1 for r in records]
    assert {r.key_id for r in records} == {owned.key_id}  # who asked, from the public tier
    named = {r.request_id for r in records if r.request_id.startswith("q-")}
    assert named and named <= set(owned.request_ids)  # and in which request
    assert all(r.answer != r.label for r in records)
    raw = b"".join(p.read_bytes() for p in owner.trigger_dir.rglob("*.svtl"))
    assert records[0].query_id.encode() not in raw and b"request_id" not in raw


def test_verifier_claims_the_copy_and_not_the_independent_model(
    owned: Owned, tmp_path: Path
) -> None:
    common = ["--model", "digits", "--deploy", str(owned.layout.root)]
    inputs = str(owned.suspects / "inputs.npy")
    copy_json, other_json = tmp_path / "copy.json", tmp_path / "other.json"
    suspect = str(owned.suspects / "copy.pt2")
    argv = ["verify-ownership", *common, "--suspect", suspect, "--inputs", inputs]
    assert main([*argv, "--json", str(copy_json)]) == 0
    suspect = str(owned.suspects / "independent.pt")
    argv = ["verify-ownership", *common, "--suspect", suspect, "--inputs", inputs]
    assert main([*argv, "--json", str(other_json)]) == 1
    claimed, independent = json.loads(copy_json.read_text()), json.loads(other_json.read_text())
    assert claimed["claimed"] and claimed["results"][0]["p_value"] < 2.0**-64
    assert claimed["triggers"]["found"] == claimed["triggers"]["selected"] > 0
    assert not independent["claimed"] and independent["results"][0]["p_value"] > 1e-3
    # The key was chosen among draws at pack: each draw is a test, the threshold shares alpha.
    choice = json.loads((owned.layout.private.model("digits") / CHOICE_FILE).read_text())
    assert claimed["key_draws"] == choice["draws"] >= 1
    schemes = len(claimed["results"])
    assert claimed["threshold"] == pytest.approx(claimed["alpha"] / (schemes * choice["draws"]))


def test_evidence_report_and_a_tampered_trail(owned: Owned, tmp_path: Path) -> None:
    suspect = ["--suspect", str(owned.suspects / "copy.pt2")]
    suspect += ["--inputs", str(owned.suspects / "inputs.npy")]
    out = tmp_path / "report"
    argv = ["evidence", "--key", owned.key_id, "--model", "digits", "--out", str(out)]
    assert main([*argv, "--deploy", str(owned.layout.root), *suspect]) == 0
    evidence = json.loads((out / "evidence.json").read_text())
    page = (out / "evidence.html").read_text()
    assert evidence["audit"]["status"] == "OK"
    assert len(evidence["audit"]["records"]) == len(owned.request_ids) + 1
    assert evidence["api_key"]["terms_acceptances"][0]["version"] == "1"
    assert evidence["triggers"]["records"]  # linked to the key by key id or request id
    assert evidence["verification"]["claimed"]
    assert 'Audit trail verification: <span class="ok">OK' in page
    assert "<script" not in page and "src=" not in page and "href=" not in page

    tampered = DeployLayout(shutil.copytree(owned.layout.root, tmp_path / "copy"))
    with sqlite3.connect(tampered.public.root / "state" / "audit.sqlite3") as db:
        db.execute("UPDATE audit SET client = '10.9.9.9' WHERE seq = 2")
    out = tmp_path / "tampered"
    argv = ["evidence", "--key", owned.key_id, "--model", "digits", "--out", str(out)]
    assert main([*argv, "--deploy", str(tampered.root)]) == 0
    evidence = json.loads((out / "evidence.json").read_text())
    assert evidence["audit"]["status"] == "FAILED"
    assert "record 2" in evidence["audit"]["problem"]
    assert (
        'Audit trail verification: <span class="failed">FAILED'
        in (out / "evidence.html").read_text()
    )


def test_a_watermarked_model_without_its_key_does_not_load(owned: Owned, tmp_path: Path) -> None:
    folder = Path(shutil.copytree(owned.layout.private.model("digits"), tmp_path / "digits"))
    (folder / WATERMARK_KEY_FILE).unlink()
    with pytest.raises(ModelLoadFailure, match="watermark key"):
        load_back_stage(folder, LocalFileKeyProvider.load(owned.layout.kek))
