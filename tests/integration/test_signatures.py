"""Customer request signatures end to end (issue 13 item 3), real processes and real mTLS.

One deployment whose digits model label-watermarks half of all queries, so that nearly every
answered request leaves trigger records. Two customers: ``signer`` holds an Ed25519 key made on
its side (``splitvault keys signer-create``) whose public key the operator registered on the
private side (``keys signer-register``); ``bearer`` signs nothing. The red team holds the public
tier's client certificate and calls the private tier directly, as a host that controls the
public tier can: under the signer's key id it is refused, and nothing is recorded under it.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from splitvault_client import Client, RequestSigner, Unauthorized

from private_core.watermark.keys import WATERMARK_KEY_FILE, load_key
from private_core.watermark.triggers import TriggerRecord, read_triggers
from protos import inference_pb2, inference_pb2_grpc
from public_api.front import load_front_stages, run_front
from public_api.keys import parse_key_id
from public_api.sealed_store import SEALED_DB, Retention, SealedRecord, SealedStore, read_sealed
from public_api.sealing import OWNER_PUBLIC_KEY, content_digest, load_public_key, seal
from shared.keys import LocalFileKeyProvider
from shared.layout import DeployLayout
from shared.manifest import TopKPolicy, WatermarkConfig
from shared.signatures import SignedRequest, signature_params
from shared.tensor_codec import to_proto
from splitvault.demo import digits
from splitvault.deploy import init_deployment
from splitvault.ownership.sealed import generate_owner_key
from splitvault.packing.pack import pack_spec
from tests.conftest import DigitsFixture, issue_key
from tests.support.deployments import copy_deployment, pairing_id
from tests.support.processes import TierProcess, start_private, start_public, wait_for
from tests.support.stack import REPO_ROOT, https, image_request, tier_env

pytestmark = pytest.mark.slow

MODEL = "digits"
WINDOW_S = 60
ENV = {**tier_env(), "SPLITVAULT_PRIVATE_SIGNATURE_WINDOW_S": str(WINDOW_S)}


@dataclass
class Signed:
    """The deployment, its two customers and the running tiers."""

    layout: DeployLayout
    signer_key: str  # bearer token of the signing customer
    signer_id: str
    signing_key: Path
    owner_key: Path  # the owner's private key: the public tier seals bodies to its public half
    bearer_key: str
    bearer_id: str
    images: np.ndarray
    private: TierProcess
    public: TierProcess

    @property
    def url(self) -> str:
        return f"https://localhost:{self.public.port}"


def _cli(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "splitvault", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return done.stdout


@pytest.fixture(scope="module")
def signed(
    tmp_path_factory: pytest.TempPathFactory, digits_model: DigitsFixture
) -> Iterator[Signed]:
    root = tmp_path_factory.mktemp("signatures")
    layout = init_deployment(root / "d")
    pack_spec(
        digits_model.spec,
        name=MODEL,
        split=digits.SPLIT,
        layout=layout,
        provider=LocalFileKeyProvider.load(layout.kek),
        policy=TopKPolicy(k=3),
        show_progress=False,
        watermark=WatermarkConfig(
            enabled=True, scheme="label", marks="query", fraction=0.5, max_confidence=1
        ),
    )
    signer_key, bearer_key = issue_key(layout, "signer"), issue_key(layout, "bearer")
    signer_id, bearer_id = parse_key_id(signer_key), parse_key_id(bearer_key)
    assert signer_id is not None and bearer_id is not None
    # The customer makes its key on its side; the operator registers the public key privately.
    deployment = _cli("keys", "signers", "--deploy", str(layout.root)).split()[-1]
    key_file = root / "customer" / "signing-key.json"
    key_file.parent.mkdir()
    created = _cli(
        "keys", "signer-create", "--key-id", signer_id, "--deployment", deployment,
        "--out", str(key_file),
    )  # fmt: skip
    public_key = created.split("--public-key ")[1].strip()
    _cli("keys", "signer-register", "--deploy", str(layout.root), "--key-id", signer_id,
         "--public-key", public_key)  # fmt: skip
    owner_key, _, _ = generate_owner_key(layout.root)
    private = start_private(layout.root, env=ENV)
    public = start_public(layout.root, private.port, env=ENV)
    try:
        yield Signed(
            layout, signer_key, signer_id, key_file, owner_key, bearer_key, bearer_id,
            digits_model.data.test_x, private, public,
        )  # fmt: skip
    finally:
        public.stop()
        private.stop()


def _triggers(layout: DeployLayout, key_id: str) -> list[TriggerRecord]:
    """The key's trigger records once the private tier's writer thread (it writes queued
    records every 50 ms) has caught up: some found, and the same count three reads running."""
    deadline = time.monotonic() + 30
    found, same = _read_triggers(layout, key_id), 0
    while (not found or same < 3) and time.monotonic() < deadline:
        time.sleep(0.1)
        again = _read_triggers(layout, key_id)
        same = same + 1 if len(again) == len(found) else 0
        found = again
    return found


def _read_triggers(layout: DeployLayout, key_id: str) -> list[TriggerRecord]:
    key = load_key(
        layout.private.model(MODEL) / WATERMARK_KEY_FILE, LocalFileKeyProvider.load(layout.kek)
    )
    folder = layout.private.state / "triggers" / MODEL
    return [r for r in read_triggers(folder, MODEL, key) if r.key_id == key_id]


def _activations(layout: DeployLayout, images: np.ndarray) -> list[inference_pb2.Tensor]:
    stage = load_front_stages(layout.public)[MODEL]
    outputs = run_front(stage, {"image": np.ascontiguousarray(images, dtype=np.float32)})
    return [to_proto(name, value) for name, value in outputs.items()]


def _signature(headers: dict[str, str]) -> inference_pb2.RequestSignature:
    found = SignedRequest.from_headers("POST", {k.lower(): v for k, v in headers.items()})
    assert found is not None
    return inference_pb2.RequestSignature(**found.record())


def _sign(s: Signed, rows: int, top_k: int = 3, created: float | None = None) -> dict[str, str]:
    """What the customer's SDK sends with a request of ``rows`` images."""
    when = None if created is None else dt.datetime.fromtimestamp(created, dt.UTC)
    body = json.dumps(image_request(s.images[:rows])).encode()
    shapes = {"image": (rows, 1, 8, 8)}
    return RequestSigner.load(s.signing_key).headers(MODEL, body, shapes, top_k, created=when)


def _signed_body(s: Signed, images: np.ndarray) -> tuple[bytes, inference_pb2.RequestSignature]:
    """A body of ``images`` and the customer's genuine signature over it."""
    body = json.dumps(image_request(images)).encode()
    shapes = {"image": tuple(images.shape)}
    return body, _signature(RequestSigner.load(s.signing_key).headers(MODEL, body, shapes, 3))


class RedTeam:
    """The public tier's client certificate, used directly against the private tier."""

    def __init__(self, layout: DeployLayout, port: int) -> None:
        tls = layout.public.tls
        credentials = grpc.ssl_channel_credentials(
            root_certificates=layout.public.ca_cert.read_bytes(),
            private_key=(tls / "client.key").read_bytes(),
            certificate_chain=(tls / "client.crt").read_bytes(),
        )
        self.channel = grpc.secure_channel(
            f"127.0.0.1:{port}",
            credentials,
            options=[("grpc.ssl_target_name_override", "splitvault-private")],
        )
        self.stub = inference_pb2_grpc.PrivateInferenceStub(self.channel)

    def infer(self, request: inference_pb2.InferRequest) -> grpc.StatusCode:
        try:
            self.stub.Infer(request, timeout=30)
        except grpc.RpcError as error:
            return error.code()
        return grpc.StatusCode.OK


def _request(
    s: Signed,
    rows: int,
    key_id: str,
    signature: inference_pb2.RequestSignature | None = None,
    top_k: int = 3,
    images: np.ndarray | None = None,
) -> inference_pb2.InferRequest:
    """A request for the private tier: the activations of ``images`` (or the first ``rows``)."""
    return inference_pb2.InferRequest(
        model=MODEL,
        inputs=_activations(s.layout, s.images[:rows] if images is None else images),
        top_k=top_k,
        request_id=f"redteam-{time.monotonic_ns()}",
        key_id=key_id,
        signature=signature,
        pairing_id=pairing_id(s.layout, MODEL),
    )


def test_signed_sdk_requests_are_answered_and_recorded_as_signed(signed: Signed) -> None:
    with Client(signed.url, api_key=signed.signer_key, ca=signed.layout.public.ca_cert,
                signing_key=signed.signing_key) as client:  # fmt: skip
        first = client.predict(MODEL, signed.images[:32], top_k=2)
        second = client.predict(MODEL, signed.images[:32], top_k=2)  # a new nonce: answered
    assert first.indices is not None and first.indices.shape == (32, 2)
    np.testing.assert_array_equal(first.indices, second.indices)
    records = _triggers(signed.layout, signed.signer_id)
    assert records and all(r.attribution == "signed" for r in records)
    claims = {r.signature["claims"] for r in records}
    assert all("rows=32" in c and "k=2" in c and signed.signer_id in c for c in claims)


def test_bearer_keys_still_work_labelled_public(signed: Signed) -> None:
    with Client(signed.url, api_key=signed.bearer_key, ca=signed.layout.public.ca_cert) as client:
        assert client.predict(MODEL, signed.images[:16]).indices is not None
    records = _triggers(signed.layout, signed.bearer_id)
    assert records and all(r.attribution == "public" and not r.signature for r in records)


def test_the_signer_key_without_a_signature_gets_401(signed: Signed) -> None:
    before = len(_triggers(signed.layout, signed.signer_id))
    with https(signed.layout, signed.public.port, signed.signer_key) as http:
        response = http.post(f"/v2/models/{MODEL}/infer", json=image_request(signed.images[:8]))
    assert response.status_code == 401
    assert "signs its requests" in response.json()["error"]
    with Client(signed.url, api_key=signed.signer_key, ca=signed.layout.public.ca_cert) as client, \
            pytest.raises(Unauthorized):  # fmt: skip
        client.predict(MODEL, signed.images[:8])
    assert len(_triggers(signed.layout, signed.signer_id)) == before


def test_a_tampered_body_under_a_genuine_signature_gets_401(signed: Signed) -> None:
    headers = _sign(signed, rows=4)
    body = image_request(signed.images[4:8])  # another 4 images under the same signature
    with https(signed.layout, signed.public.port, signed.signer_key) as http:
        response = http.post(f"/v2/models/{MODEL}/infer", json=body, headers=headers)
    assert response.status_code == 401
    assert "Content-Digest" in response.json()["error"]


def test_redteam_cannot_record_anything_under_the_signer_key(signed: Signed) -> None:
    red = RedTeam(signed.layout, signed.private.port)
    before = len(_triggers(signed.layout, signed.signer_id))
    denied = grpc.StatusCode.PERMISSION_DENIED
    # Unsigned, under the signer's key id: the forged-attribution replay of issue 13.
    assert red.infer(_request(signed, 64, signed.signer_id)) == denied
    # A genuine signature over 4 rows, spent on 64.
    assert red.infer(_request(signed, 64, signed.signer_id, _signature(_sign(signed, 4)))) == denied
    # A genuine signature for k=1, asking k=3.
    one = _signature(_sign(signed, 8, top_k=1))
    assert red.infer(_request(signed, 8, signed.signer_id, one, top_k=3)) == denied
    # A genuine signature sent under another key id.
    assert red.infer(_request(signed, 8, signed.bearer_id, _signature(_sign(signed, 8)))) == denied
    # A signature made outside the window.
    stale = _signature(_sign(signed, 8, created=time.time() - 2 * WINDOW_S))
    assert red.infer(_request(signed, 8, signed.signer_id, stale)) == denied
    assert len(_triggers(signed.layout, signed.signer_id)) == before
    # A captured genuine request: answered once, then refused.
    captured = _request(signed, 8, signed.signer_id, _signature(_sign(signed, 8)))
    assert red.infer(captured) == grpc.StatusCode.OK
    after_one = len(_triggers(signed.layout, signed.signer_id))
    assert red.infer(captured) == denied
    assert len(_triggers(signed.layout, signed.signer_id)) == after_one
    wait_for(
        lambda: any(
            e.get("request_id") == captured.request_id and "already answered" in e["reason"]
            for e in signed.private.events()
            if e.get("event") == "request_signature_refused"
        ),
        what="the replay's refusal in the private tier's log",
    )
    red.channel.close()


def test_a_replay_is_refused_after_the_private_tier_restarts(
    signed: Signed, tmp_path: Path
) -> None:
    """A second private tier on one state folder: answered, restarted, replay refused. It runs
    on a copy of the deployment, so that it never appends to the running tier's trigger log."""
    captured = _request(signed, 8, signed.signer_id, _signature(_sign(signed, 8)))
    root = copy_deployment(signed.layout, tmp_path / "d", skip_models=()).root
    first = start_private(root, env=ENV)
    try:
        red = RedTeam(signed.layout, first.port)
        assert red.infer(captured) == grpc.StatusCode.OK
        red.channel.close()
    finally:
        first.stop()
    again = start_private(root, env=ENV)
    try:
        red = RedTeam(signed.layout, again.port)
        assert red.infer(captured) == grpc.StatusCode.PERMISSION_DENIED
        red.channel.close()
        (event,) = again.wait_for_events("request_signature_refused")
        assert "already answered" in event["reason"]
    finally:
        again.stop()


def test_evidence_labels_signed_and_public_records(signed: Signed, tmp_path: Path) -> None:
    """Without the owner's key no content is checked: signed records are ``signed only``."""
    # Its own records (the test runs alone too): each key's answers include marked ones.
    with Client(signed.url, api_key=signed.signer_key, ca=signed.layout.public.ca_cert,
                signing_key=signed.signing_key) as client:  # fmt: skip
        assert client.predict(MODEL, signed.images[:32], top_k=2).indices is not None
    with Client(signed.url, api_key=signed.bearer_key, ca=signed.layout.public.ca_cert) as client:
        assert client.predict(MODEL, signed.images[:16]).indices is not None
    assert _triggers(signed.layout, signed.signer_id) and _triggers(signed.layout, signed.bearer_id)
    for key, key_id, expected in (
        (signed.signer_id, signed.signer_id, {"signed only"}),
        (signed.bearer_id, signed.bearer_id, {"attributed by the public tier alone"}),
    ):
        out = tmp_path / key_id
        _cli("evidence", "--key", key, "--model", MODEL, "--deploy", str(signed.layout.root),
             "--out", str(out))  # fmt: skip
        evidence = json.loads((out / "evidence.json").read_text())
        records = evidence["triggers"]["records"]
        assert records and {r["attributed"] for r in records} == expected
        assert "attributed" in (out / "evidence.html").read_text()


def _nonce(record: TriggerRecord) -> str:
    return signature_params(SignedRequest(**record.signature)).nonce


def _sealed_rows(layout: DeployLayout, nonces: set[str]) -> dict[str, SealedRecord]:
    """The public tier's sealed rows carrying these signature nonces, once all are written."""
    path = layout.public.root / "state" / SEALED_DB
    found: dict[str, SealedRecord] = {}

    def written() -> bool:
        found.update({r.signature_nonce: r for r in read_sealed(path)})
        return nonces <= found.keys()

    wait_for(written, what="the signed bodies' sealed rows")
    return {nonce: found[nonce] for nonce in nonces}


def _evidence(s: Signed, out: Path) -> tuple[str, dict[str, Any]]:
    """``splitvault evidence`` for the signing customer, with the owner's key: stdout, JSON."""
    stdout = _cli("evidence", "--key", s.signer_id, "--model", MODEL, "--deploy",
                  str(s.layout.root), "--out", str(out), "--owner-key", str(s.owner_key))  # fmt: skip
    return stdout, json.loads((out / "evidence.json").read_text())


def test_a_signed_sdk_call_is_content_verified(signed: Signed, tmp_path: Path) -> None:
    before = {_nonce(r) for r in _triggers(signed.layout, signed.signer_id)}
    with Client(signed.url, api_key=signed.signer_key, ca=signed.layout.public.ca_cert,
                signing_key=signed.signing_key) as client:  # fmt: skip
        assert client.predict(MODEL, signed.images[100:140], top_k=2).indices is not None
    records = [r for r in _triggers(signed.layout, signed.signer_id) if _nonce(r) not in before]
    nonces = {_nonce(r) for r in records}
    assert len(nonces) == 1
    # The bytes the SDK signed are the bytes the public tier sealed.
    (row,) = _sealed_rows(signed.layout, nonces).values()
    assert content_digest(row.body_sha256) == records[0].signature["content_digest"]
    _, evidence = _evidence(signed, tmp_path / "report")
    checked = [r for r in evidence["triggers"]["records"] if _nonce_of(r) in nonces]
    assert len(checked) == len(records)
    assert {r["attributed"] for r in checked} == {"signed and content-verified"}
    assert {r["content"]["activations"] for r in checked} == {"match"}


def _nonce_of(record: dict[str, Any]) -> str:
    return (
        signature_params(SignedRequest(**record["signature"])).nonce if record["signature"] else ""
    )


def test_content_substituted_by_the_public_host_is_a_content_mismatch(
    signed: Signed, tmp_path: Path
) -> None:
    """The host holds the public tier's certificate and owner.pub: it answers other activations
    under a genuine signature and seals the genuine body, or seals other bytes than signed."""
    red = RedTeam(signed.layout, signed.private.port)
    body, signature = _signed_body(signed, signed.images[200:216])
    other = _request(signed, 16, signed.signer_id, signature, images=signed.images[300:316])
    assert red.infer(other) == grpc.StatusCode.OK  # activations of images nobody signed
    _, honest = _signed_body(signed, signed.images[232:248])
    swapped = _request(signed, 16, signed.signer_id, honest, images=signed.images[232:248])
    assert red.infer(swapped) == grpc.StatusCode.OK
    red.channel.close()
    store = SealedStore(
        signed.layout.public.root / "state" / SEALED_DB, Retention(10**6, 1 << 30, 1e9)
    )
    public_key = load_public_key(signed.layout.public.root / OWNER_PUBLIC_KEY)
    for request, sealed_body, wire in (
        (other, body, signature),  # the genuine body, sealed honestly
        (
            swapped,
            json.dumps(image_request(signed.images[248:264])).encode(),
            honest,
        ),  # other bytes
    ):
        nonce = signature_params(SignedRequest(**_wire(wire))).nonce
        store.insert([seal(sealed_body, public_key, time_s=time.time(), key_id=signed.signer_id,
                           model=MODEL, request_id=request.request_id, nonce=nonce)])  # fmt: skip
    store.close()
    _triggers(signed.layout, signed.signer_id)  # the writer has caught up
    stdout, evidence = _evidence(signed, tmp_path / "report")
    by_request = {r["request_id"]: r for r in evidence["triggers"]["records"]}
    answered, resealed = by_request[other.request_id], by_request[swapped.request_id]
    assert answered["attributed"] == resealed["attributed"] == "content mismatch"
    assert answered["content"]["activations"] == "differ"
    assert "SHA-256 differs" in resealed["content"]["reason"]
    assert evidence["triggers"]["content_mismatches"] >= 2
    assert "CONTENT MISMATCH" in stdout
    assert "CONTENT MISMATCH" in (tmp_path / "report" / "evidence.html").read_text()


def _wire(signature: inference_pb2.RequestSignature) -> dict[str, str]:
    return {
        "method": signature.method,
        "content_digest": signature.content_digest,
        "claims": signature.claims,
        "signature_input": signature.signature_input,
        "signature": signature.signature,
    }
