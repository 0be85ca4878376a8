"""Sealed request bodies through real tiers: the exact bytes, sealed to the owner's key, used
as verification candidates once opened offline; and the evidence report in a real browser."""

from __future__ import annotations

import contextlib
import json
import shutil
import sqlite3
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from PIL import Image
from torch import nn

from protos import open_inference_pb2 as oip
from public_api.keys import parse_key_id
from public_api.sealed_store import SEALED_DB, read_sealed
from public_api.sealing import open_sealed
from shared.keys import LocalFileKeyProvider
from shared.layout import DeployLayout
from shared.manifest import TopKPolicy, WatermarkConfig
from splitvault.cli import main
from splitvault.demo import digits
from splitvault.deploy import init_deployment
from splitvault.ownership.report_svg import SAMPLES_COLOUR
from splitvault.ownership.sealed import generate_owner_key, load_owner_key
from splitvault.packing.pack import pack_spec
from tests.conftest import DigitsFixture, issue_key
from tests.support.processes import start_private, start_public
from tests.support.stack import https, image_request, tier_env

pytestmark = pytest.mark.slow
BATCH = 64


Report = tuple[int, dict[str, Any], Path]  # verify-ownership's exit code and JSON, report folder


@dataclass(frozen=True)
class Sealed:
    """A deployment with an owner key, and what one key sent and got through the public API."""

    layout: DeployLayout
    owner_key: Path
    key_id: str
    bodies: list[bytes | None]  # exactly as sent, in order (None: sent over gRPC)
    answers: np.ndarray  # top-1 labels returned
    images: np.ndarray
    terms: str


@pytest.fixture(scope="module")
def sealed(tmp_path_factory: pytest.TempPathFactory, digits_model: DigitsFixture) -> Sealed:
    root = tmp_path_factory.mktemp("sealing")
    layout = init_deployment(root / "d")
    pack_spec(
        digits_model.spec,
        name="digits",
        split=digits.SPLIT,
        layout=layout,
        provider=LocalFileKeyProvider.load(layout.kek),
        policy=TopKPolicy(k=3),
        show_progress=False,
        watermark=WatermarkConfig(
            enabled=True, scheme="label", marks="query", fraction=0.1, max_confidence=1
        ),
    )
    owner_key, _, _ = generate_owner_key(layout.root)
    secret = issue_key(layout, "thief")
    images = digits_model.data.test_x
    batches = [images[i : i + BATCH] for i in range(0, len(images), BATCH)]
    private = start_private(layout.root, env=tier_env())
    try:
        env = {**tier_env(), "SPLITVAULT_PUBLIC_GRPC_PORT": "0"}
        public = start_public(layout.root, private.port, env=env)
        try:
            (listening,) = public.wait_for_events("grpc_ingress_listening")
            with https(layout, public.port, secret) as client:
                terms = client.get("/v1/terms").json()["text"]
                sent = [_send(client, int(listening["port"]), layout, secret, n, b)
                        for n, b in enumerate(batches)]  # fmt: skip
        finally:
            public.stop()
    finally:
        private.stop()
    answers = np.concatenate([answer for _, answer in sent])
    key_id = parse_key_id(secret)
    assert key_id is not None
    bodies = [body for body, _ in sent]
    return Sealed(layout, owner_key, key_id, bodies, answers, images, terms)


def _send(
    http: httpx.Client, grpc_port: int, layout: DeployLayout, secret: str, n: int, x: np.ndarray
) -> tuple[bytes | None, np.ndarray]:
    """Batch ``n`` in turn as v2 JSON, v2 binary tensors (REST) or a stock gRPC client's
    ``ModelInferRequest``: the exact body sent (None for gRPC) and the top-1 labels answered."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if n % 3 == 2:
        tensor = grpcclient.InferInput("image", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        wanted = grpcclient.InferRequestedOutput("classification", class_count=3)
        client = grpcclient.InferenceServerClient(
            f"localhost:{grpc_port}", ssl=True, root_certificates=str(layout.public.ca_cert)
        )
        with contextlib.closing(client):
            result = client.infer("digits", [tensor], outputs=[wanted], request_id=f"s-{n}",
                                  headers={"authorization": f"Bearer {secret}"})  # fmt: skip
        strings = result.as_numpy("classification")[:, 0]
        return None, np.array([int(item.decode().split(":")[1]) for item in strings])
    headers = {"Content-Type": "application/json"}
    body = json.dumps(image_request(x, id=f"s-{n}")).encode()
    if n % 3 == 1:
        head = json.dumps({"id": f"s-{n}", "inputs": [{"name": "image", "shape": list(x.shape),
                           "datatype": "FP32", "parameters": {"binary_data_size": x.nbytes}}]})  # fmt: skip
        body = head.encode() + x.tobytes()
        headers = {"Inference-Header-Content-Length": str(len(head.encode()))}
    reply = http.post("/v2/models/digits/infer", content=body, headers=headers)
    assert reply.status_code == 200, reply.text
    return body, np.array([int(s.split(":")[1]) for s in reply.json()["outputs"][0]["data"][::3]])


def test_each_served_body_is_sealed_exactly_and_only_the_owner_opens_it(sealed: Sealed) -> None:
    path = sealed.layout.public.root / "state" / SEALED_DB
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not (sealed.layout.public.root / "owner").exists()  # the private key is elsewhere
    records = list(read_sealed(path, sealed.key_id))
    assert [r.request_id for r in records] == [f"s-{n}" for n in range(len(sealed.bodies))]
    private_key = load_owner_key(sealed.owner_key)
    opened = [open_sealed(r, private_key) for r in records]
    assert [b for b, sent in zip(opened, sealed.bodies, strict=True) if sent] == [
        b for b in sealed.bodies if b
    ]
    assert [r.content_type.split(";")[0] for r in records[:3]] == [
        "application/json", "application/octet-stream", "application/grpc+proto"
    ]  # fmt: skip
    grpc_body = oip.ModelInferRequest.FromString(opened[2])  # the stock client's message
    rows = sealed.images[2 * BATCH : 3 * BATCH].astype(np.float32)
    assert grpc_body.id == "s-2" and grpc_body.raw_input_contents[0] == rows.tobytes()
    raw = b"".join(p.read_bytes() for p in path.parent.glob(SEALED_DB + "*"))
    assert opened[0][:200] not in raw and b'"data"' not in raw
    with pytest.raises(ValueError, match="does not open"):
        open_sealed(records[0], X25519PrivateKey.generate())
    moved = type(records[0])(**{**records[0].__dict__, "key_id": "k_someone_else"})
    with pytest.raises(ValueError, match="does not open"):
        open_sealed(moved, private_key)


def test_the_terms_say_what_is_sealed_and_for_how_long(sealed: Sealed) -> None:
    assert "Retention of request bodies" in sealed.terms
    assert "50,000 bodies" in sealed.terms and "365 days" in sealed.terms
    assert "delete" in sealed.terms


def _copy_of(images: np.ndarray, labels: np.ndarray, folder: Path) -> Path:
    """A model trained on the API's answers, saved as a torch.export program."""
    torch.manual_seed(1)
    model = digits.DigitsCNN()
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    for _ in range(80):
        for batch in torch.split(torch.randperm(len(x)), 32):
            optimiser.zero_grad()
            loss: torch.Tensor = nn.functional.cross_entropy(model(x[batch]), y[batch])
            loss.backward()  # type: ignore[no-untyped-call]
            optimiser.step()
    dim = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(model.eval(), (x[:4],), dynamic_shapes={"image": {0: dim}})
    torch.export.save(program, folder / "copy.pt2")
    return folder / "copy.pt2"


@pytest.fixture(scope="module")
def report(
    sealed: Sealed, digits_model: DigitsFixture, tmp_path_factory: pytest.TempPathFactory
) -> Report:
    """``verify-ownership`` and ``evidence`` with the key's sealed queries and the owner's data."""
    folder = tmp_path_factory.mktemp("suspect")
    copy = _copy_of(sealed.images, sealed.answers, folder)
    owner_data = folder / "owner.npy"
    np.save(owner_data, digits_model.data.train_x[:600])
    common = ["--model", "digits", "--deploy", str(sealed.layout.root), "--suspect", str(copy)]
    sources = ["--key", "thief", "--owner-key", str(sealed.owner_key)]
    sources += ["--inputs", str(owner_data)]
    verdict = folder / "verdict.json"
    code = main(["verify-ownership", *common, *sources, "--json", str(verdict)])
    out = folder / "report"
    assert main(["evidence", *common, *sources, "--out", str(out)]) == 0
    return code, json.loads(verdict.read_text()), out


def test_sealed_queries_prove_ownership_without_discovery(sealed: Sealed, report: Report) -> None:
    code, verdict, out = report
    assert code == 0 and verdict["claimed"]
    by_source = {s["source"]: s for s in verdict["sources"]}
    from_sealed = by_source["sealed queries of API key thief"]
    assert from_sealed["received"] == len(sealed.images)  # JSON, binary and gRPC bodies read
    assert from_sealed["claimed"] and from_sealed["results"][0]["p_value"] < 2.0**-64
    owner_data = by_source["owner's inputs owner.npy"]
    assert owner_data["results"][0]["p_value"] > 0  # reported, whatever it is
    evidence = json.loads((out / "evidence.json").read_text())
    assert evidence["sealed"]["bodies"] == len(sealed.bodies) == evidence["sealed"]["matched_audit"]
    assert evidence["sealed"]["requests"][0]["content_digest"].startswith("sha-256=:")
    assert evidence["verification"]["claimed"]
    assert evidence["audit"]["timeline"][0]["samples"] == len(sealed.images)


def test_sealed_bodies_of_a_key_can_be_deleted(sealed: Sealed, tmp_path: Path) -> None:
    copy = DeployLayout(shutil.copytree(sealed.layout.root, tmp_path / "d"))
    assert main(["sealed", "delete", "--deploy", str(copy.root), "--key", "thief"]) == 0
    with sqlite3.connect(copy.public.root / "state" / SEALED_DB) as db:
        assert db.execute("SELECT count(*) FROM sealed").fetchone() == (0,)


def _chromium(*args: str) -> None:
    subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", *args],
        check=True,
        capture_output=True,
        timeout=120,
    )


@pytest.mark.skipif(
    not shutil.which("chromium") or not shutil.which("pdftotext"), reason="no browser"
)
def test_the_report_opens_with_the_verdict_in_a_real_browser(
    report: Report, tmp_path: Path
) -> None:
    _, verdict, out = report
    page = (out / "evidence.html").read_text()
    assert "<script" not in page and "src=" not in page and "href=" not in page
    url = (out / "evidence.html").resolve().as_uri()
    pdf, png = tmp_path / "report.pdf", tmp_path / "report.png"
    _chromium(f"--print-to-pdf={pdf}", "--no-pdf-header-footer", url)
    first = subprocess.run(
        ["pdftotext", "-f", "1", "-l", "1", "-layout", str(pdf), "-"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    best = min(r["p_value"] for s in verdict["sources"] for r in s["results"])
    assert "Verdict: OWNERSHIP CLAIMED" in first
    assert f"{best:.3g}" in first and "marks reproduced" in first
    _chromium(f"--screenshot={png}", "--window-size=1000,1800", url)
    pixels = np.asarray(Image.open(png).convert("RGB"))
    colour = np.frombuffer(bytes.fromhex(SAMPLES_COLOUR[1:]), dtype=np.uint8)
    bars = np.all(pixels == colour, axis=2)
    rows, cols = np.nonzero(bars)
    assert bars.sum() > 200, "the chart's sample bars are not drawn"
    assert cols.max() - cols.min() > 20 and rows.max() - rows.min() > 10
