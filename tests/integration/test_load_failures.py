"""A tampered, truncated, reordered or foreign-key back stage fails alone, by name, with a reason.

A copy of the deployment gets extra copies of the digits model whose ``back.pt2.enc`` is
corrupted in one way each. The private tier must still start, serve the intact models and
report every broken one (log, ModelStatus, HTTP 503) without a traceback or a partial load.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import ssl
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from private_core.activation_profile import PROFILE_FILE
from private_core.model_store import ModelLoadFailure, load_back_stage, load_store
from protos import inference_pb2, inference_pb2_grpc
from shared.crypto import FILE_ID_SIZE, MAGIC, decrypt_bytes, encrypt_stream, read_header
from shared.errors import ModelNotReady
from shared.keys import KeyProvider, LocalFileKeyProvider
from shared.layout import BACK_FILE, PRIVATE_IDENTITY, DeployLayout, TierDir
from shared.manifest import CONFIG_FILE, MANIFEST_FILE
from tests.conftest import Deployment, DigitsFixture
from tests.support.processes import TierProcess, start_private, start_public
from tests.support.stack import image_request, tier_env

# Corrupted model -> a word its failure reason must contain.
CORRUPTED = {
    "flipped": "tampered",
    "truncated": "truncated",
    "swapped": "tampered",
    "wrongkek": "KEK",
}
INTACT = ("digits", "digits-label", "nested", "rechunked")
SMALL_CHUNK = 4096
TIMEOUT = 5


def _chunk_spans(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of each chunk, length prefix included, as the format in shared/crypto lays it."""
    info = read_header(data)
    pos = len(MAGIC) + 2 + FILE_ID_SIZE + 4
    (kek_id_len,) = struct.unpack_from(">H", data, pos)
    assert data[pos + 2 : pos + 2 + kek_id_len].decode() == info.kek_id  # parser agrees
    pos += 2 + kek_id_len
    (wrapped_len,) = struct.unpack_from(">H", data, pos)
    pos += 2 + wrapped_len
    spans = []
    while pos < len(data):
        (length,) = struct.unpack_from(">I", data, pos)
        spans.append((pos, pos + 4 + length))
        pos += 4 + length
    assert pos == len(data)
    return spans


def _encrypt(plaintext: bytes, provider: KeyProvider, chunk_size: int) -> bytes:
    out = io.BytesIO()
    encrypt_stream(plaintext, out, provider, chunk_size=chunk_size)
    return out.getvalue()


def _flipped(data: bytes) -> bytes:
    middle = len(data) // 2
    start, end = next(span for span in _chunk_spans(data) if span[0] + 4 <= middle < span[1])
    assert start + 4 <= middle < end  # the flip lands in a sealed chunk body
    return data[:middle] + bytes([data[middle] ^ 0x01]) + data[middle + 1 :]


def _truncated(data: bytes) -> bytes:
    return data[: _chunk_spans(data)[-1][0]]


def _swapped(data: bytes) -> bytes:
    spans = _chunk_spans(data)
    (a0, a1), (b0, b1) = spans[1], spans[2]
    assert a1 - a0 == b1 - b0  # two full chunks: only their order changes
    return data[:a0] + data[b0:b1] + data[a0:a1] + data[b1:]


def _rename(folder: Path, name: str) -> None:
    for file, key in ((CONFIG_FILE, "name"), (MANIFEST_FILE, "model")):
        content = json.loads((folder / file).read_text("utf-8"))
        content[key] = name
        (folder / file).write_text(json.dumps(content, indent=2), "utf-8")


def _clone_digits(layout: DeployLayout, name: str, back: bytes) -> None:
    """Copy digits under ``name`` in both tiers, with ``back`` as its encrypted back stage."""
    for tier in (layout.public, layout.private):
        shutil.copytree(tier.model("digits"), tier.model(name))
        _rename(tier.model(name), name)
    (layout.private.model(name) / BACK_FILE).write_bytes(back)
    # The activation profile is sealed to digits' name: a renamed copy goes without one (its
    # monitor then checks sweeps only), as a model packed before profiles existed would.
    (layout.private.model(name) / PROFILE_FILE).unlink(missing_ok=True)


@dataclass(frozen=True)
class CorruptDeployment:
    """A copy of the deployment with the corrupted models added (MiniLM left out: cheaper)."""

    layout: DeployLayout
    provider: KeyProvider


@pytest.fixture(scope="module")
def corrupt(tmp_path_factory: pytest.TempPathFactory, deployment: Deployment) -> CorruptDeployment:
    root = tmp_path_factory.mktemp("corrupt") / "d"
    shutil.copytree(deployment.root, root, ignore=shutil.ignore_patterns("minilm"))
    layout = DeployLayout(root)
    original = (layout.private.model("digits") / BACK_FILE).read_bytes()
    plaintext = decrypt_bytes(original, deployment.provider)
    rechunked = _encrypt(plaintext, deployment.provider, SMALL_CHUNK)
    assert len(_chunk_spans(rechunked)) >= 4
    other = LocalFileKeyProvider.from_bytes(os.urandom(32))
    backs = {
        "rechunked": rechunked,
        "flipped": _flipped(original),
        "truncated": _truncated(rechunked),
        "swapped": _swapped(rechunked),
        "wrongkek": _encrypt(plaintext, other, SMALL_CHUNK),
    }
    for name, back in backs.items():
        _clone_digits(layout, name, back)
    return CorruptDeployment(layout, deployment.provider)


# ---- in process: the model store itself ------------------------------------------------------


@pytest.mark.parametrize(("name", "word"), sorted(CORRUPTED.items()))
def test_load_back_stage_refuses_each_corruption(
    corrupt: CorruptDeployment, name: str, word: str
) -> None:
    with pytest.raises(ModelLoadFailure) as caught:
        load_back_stage(corrupt.layout.private.model(name), corrupt.provider)
    reason = caught.value.reason
    assert f"model {name!r}" in reason
    assert word in reason
    assert "Traceback" not in reason


def test_rechunked_control_loads(corrupt: CorruptDeployment) -> None:
    stage = load_back_stage(corrupt.layout.private.model("rechunked"), corrupt.provider)
    assert stage.config.name == "rechunked"


def test_store_holds_no_part_of_a_failed_model(corrupt: CorruptDeployment) -> None:
    tier: TierDir = corrupt.layout.private
    before = sorted(tier.root.rglob("*"))
    store = load_store(tier, corrupt.provider)
    assert sorted(store.loaded) == sorted(INTACT)
    assert sorted(store.failed) == sorted(CORRUPTED)
    for name in CORRUPTED:
        assert store.status()[name]
        with pytest.raises(ModelNotReady):
            store.get(name)
    assert sorted(tier.root.rglob("*")) == before  # decrypted in memory: nothing written


# ---- both tiers as processes ------------------------------------------------------------------


@dataclass(frozen=True)
class CorruptTiers:
    """Both tiers running on the corrupted deployment."""

    private: TierProcess
    public: TierProcess
    layout: DeployLayout
    auth_headers: dict[str, str]


@pytest.fixture(scope="module")
def corrupt_tiers(corrupt: CorruptDeployment, deployment: Deployment) -> Iterator[CorruptTiers]:
    private = start_private(corrupt.layout.root, env=tier_env())
    try:
        public = start_public(corrupt.layout.root, private.port, env=tier_env())
    except BaseException:
        private.stop()
        raise
    # The copy carries the key store, so the session's test key works here too.
    yield CorruptTiers(private, public, corrupt.layout, deployment.auth_headers)
    public.stop()
    private.stop()


def _https(tiers: CorruptTiers) -> httpx.Client:
    context = ssl.create_default_context(cafile=str(tiers.layout.public.ca_cert))
    return httpx.Client(
        base_url=f"https://localhost:{tiers.public.port}",
        verify=context,
        timeout=TIMEOUT,
        headers=tiers.auth_headers,
    )


def _digits_body(digits_model: DigitsFixture) -> dict[str, Any]:
    return image_request(digits_model.data.test_x[:2])


def _failures(tiers: CorruptTiers) -> dict[str, str]:
    return {
        e["model"]: e["reason"]
        for e in tiers.private.events()
        if e.get("event") == "model_load_failed"
    }


@pytest.mark.slow
def test_private_tier_starts_and_serves_intact_models(
    corrupt_tiers: CorruptTiers, digits_model: DigitsFixture
) -> None:
    (listening,) = [
        e for e in corrupt_tiers.private.events() if e["event"] == "private_tier_listening"
    ]
    assert listening["models"] == sorted(INTACT)
    assert listening["failed"] == sorted(CORRUPTED)
    with _https(corrupt_tiers) as http:
        for model in ("digits", "rechunked"):
            reply = http.post(f"/v2/models/{model}/infer", json=_digits_body(digits_model))
            assert reply.status_code == 200, reply.text
            assert reply.json()["outputs"][0]["shape"] == [2, 3]


@pytest.mark.slow
def test_each_failure_is_logged_by_name_without_traceback(corrupt_tiers: CorruptTiers) -> None:
    failures = _failures(corrupt_tiers)
    assert sorted(failures) == sorted(CORRUPTED)
    for name, word in CORRUPTED.items():
        assert f"model {name!r}" in failures[name]
        assert word in failures[name]
    for tier in (corrupt_tiers.private, corrupt_tiers.public):
        assert not [line for line in tier.lines if "Traceback" in line]


@pytest.mark.slow
def test_model_status_reports_each_failure(corrupt_tiers: CorruptTiers) -> None:
    tls = corrupt_tiers.layout.public.tls
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(tls / "ca.crt").read_bytes(),
        private_key=(tls / "client.key").read_bytes(),
        certificate_chain=(tls / "client.crt").read_bytes(),
    )
    options = [("grpc.ssl_target_name_override", PRIVATE_IDENTITY)]
    address = f"127.0.0.1:{corrupt_tiers.private.port}"
    with grpc.secure_channel(address, credentials, options=options) as channel:
        stub = inference_pb2_grpc.PrivateInferenceStub(channel)
        reply = stub.ModelStatus(inference_pb2.ModelStatusRequest(), timeout=TIMEOUT)
    statuses = {status.name: status for status in reply.models}
    failures = _failures(corrupt_tiers)
    kek_text = corrupt_tiers.layout.kek.read_text().strip()
    for name in CORRUPTED:
        assert statuses[name].ready is False
        assert statuses[name].reason == failures[name]
        assert kek_text not in statuses[name].reason
    assert all(statuses[name].ready for name in INTACT)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CORRUPTED))
def test_http_answers_503_for_a_failed_model(
    corrupt_tiers: CorruptTiers, digits_model: DigitsFixture, name: str
) -> None:
    with _https(corrupt_tiers) as http:
        ready = http.get(f"/v2/models/{name}/ready")
        reply = http.post(f"/v2/models/{name}/infer", json=_digits_body(digits_model))
    assert ready.status_code == 503, ready.text
    assert ready.json()["ready"] is False
    assert reply.status_code == 503, reply.text
    assert name in reply.json()["error"]
