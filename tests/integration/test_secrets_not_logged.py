"""Secrets never appear in logs: both tiers run with every log level on (DEBUG, gRPC core at
DEBUG with all its tracers), get good and bad requests, bad and revoked keys, terms, limits, a
foreign identity and a private tier that goes away; then all their output is searched for the
API keys, the KEK, every private key and a model's watermark key, in the encodings a log
would use. Positive controls show the search finds what the output does hold.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    load_pem_private_key,
)

from private_core.watermark.keys import WATERMARK_KEY_FILE, load_key
from protos import inference_pb2, inference_pb2_grpc
from public_api.keys import KEYS_DB, STATE_DIR, SqliteKeyStore, parse_key_id
from shared.keys import LocalFileKeyProvider
from shared.layout import PRIVATE_IDENTITY, DeployLayout
from shared.manifest import TopKPolicy, WatermarkConfig
from splitvault.demo import digits
from splitvault.packing.pack import pack_spec
from tests.conftest import Deployment, DigitsFixture, issue_key
from tests.support.processes import TierProcess, start_public, start_tier
from tests.support.stack import REPO_ROOT, copy_deployment, https, tier_env

pytestmark = pytest.mark.slow

LOUD = {
    **tier_env(),
    "SPLITVAULT_PRIVATE_LOG_LEVEL": "DEBUG",
    "SPLITVAULT_PUBLIC_LOG_LEVEL": "DEBUG",
    "GRPC_VERBOSITY": "DEBUG",
    "GRPC_TRACE": "all",
}
INFER = "/v2/models/digits/infer"
BODY: dict[str, Any] = {
    "id": "request-1",
    "inputs": [{"name": "image", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.5] * 64}],
}


@dataclass
class Exercised:
    """Everything the tiers wrote, and the secrets they held or were sent."""

    output: str
    secrets: dict[str, str]  # what -> the exact text that must not appear
    certificate_lines: list[str]  # public: the positive control for the PEM search


def _key_needles(name: str, pem: bytes, certificates: set[str]) -> dict[str, str]:
    """A private key as PEM, its base64 body and lines, and its secret number in hex/base64.

    A PEM line that also occurs in a certificate holds public bytes only (an EC key's last
    line is its public point); such lines are left out.
    """
    text = pem.decode()
    body = [line for line in text.splitlines() if line and not line.startswith("-----")]
    needles = {f"{name} PEM": text.strip(), f"{name} PEM body": "".join(body)}
    for number, line in enumerate(body):
        if not any(line in cert for cert in certificates):
            needles[f"{name} PEM line {number}"] = line
    key = load_pem_private_key(pem, password=None)
    if isinstance(key, ed25519.Ed25519PrivateKey):  # the private ledger's signing key
        raw = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        return {**needles, **_encodings(f"{name} private bytes", raw)}
    if isinstance(key, ec.EllipticCurvePrivateKey):
        secret = key.private_numbers().private_value
    else:
        assert isinstance(key, rsa.RSAPrivateKey)
        secret = key.private_numbers().d
    raw = secret.to_bytes((secret.bit_length() + 7) // 8, "big")
    return {**needles, **_encodings(f"{name} private number", raw)}


def _encodings(what: str, raw: bytes) -> dict[str, str]:
    return {
        f"{what} (hex)": raw.hex(),
        f"{what} (HEX)": raw.hex().upper(),
        f"{what} (base64)": base64.b64encode(raw).decode().rstrip("="),
        f"{what} (base64url)": base64.urlsafe_b64encode(raw).decode().rstrip("="),
    }


def _api_key_needles(name: str, token: str) -> dict[str, str]:
    """The whole token and its secret part (``sv_k_<id>_<secret>``)."""
    key_id = parse_key_id(token)
    secret = token.split(f"{key_id}_", 1)[-1] if key_id else token
    return {f"API key {name}": token, f"API key {name} secret part": secret}


def _deployment_secrets(layout: DeployLayout, kek_text: str) -> dict[str, str]:
    texts = [path.read_text() for path in layout.root.rglob("*.crt")]
    certificates = set(texts) | {"".join(text.split()) for text in texts}
    secrets = {"KEK (base64 file text)": kek_text}
    secrets |= _encodings("KEK", base64.b64decode(kek_text))
    for path in sorted(layout.root.rglob("*.key")):
        name = str(path.relative_to(layout.root))
        secrets |= _key_needles(name, path.read_bytes(), certificates)
    return secrets


@pytest.fixture(scope="module")
def exercised(
    deployment: Deployment, digits_model: DigitsFixture, tmp_path_factory: pytest.TempPathFactory
) -> Exercised:
    root = tmp_path_factory.mktemp("secrets") / "d"
    layout = copy_deployment(deployment.root, root, skip_models={"minilm", "nested"})
    kek_text = layout.kek.read_text().strip()
    secrets = _deployment_secrets(layout, kek_text)
    secrets |= _encodings("watermark key", _pack_watermarked(layout, digits_model))
    # The private tier gets its KEK as a secret in its environment, not from the file.
    layout.kek.rename(root.parent / "kek.outside")
    keys = _issue_keys(layout)
    wrong = keys["good"][:-6] + "AAAAAA"  # the right key id, a wrong secret
    for name, token in {**keys, "wrong": wrong}.items():
        secrets |= _api_key_needles(name, token)
    output = _run_tiers(layout, kek_text, keys, wrong)
    bad_kek = base64.b64encode(b"\x07" * 31).decode()
    secrets["malformed KEK given to a tier"] = bad_kek
    output += _failed_start(layout, bad_kek)
    certificate_lines = [
        line
        for path in layout.root.rglob("*.crt")
        for line in path.read_text().splitlines()
        if not line.startswith("-----")
    ]
    return Exercised(output, secrets, certificate_lines)


def _pack_watermarked(layout: DeployLayout, digits_model: DigitsFixture) -> bytes:
    """Pack digits again with a watermark; returns its (decrypted) watermark key."""
    provider = LocalFileKeyProvider.load(layout.kek)
    pack_spec(
        digits_model.spec,
        name="digits-wm",
        split=digits.SPLIT,
        layout=layout,
        provider=provider,
        policy=TopKPolicy(k=3),
        show_progress=False,
        watermark=WatermarkConfig(
            enabled=True, marks="query", scheme="label", max_confidence=1.0, fraction=0.5
        ),
    )
    return load_key(layout.private.model("digits-wm") / WATERMARK_KEY_FILE, provider).secret


def _issue_keys(layout: DeployLayout) -> dict[str, str]:
    """A good key, one that has not accepted the terms, a rate-limited and a revoked one."""
    keys = {
        "good": issue_key(layout, "good"),
        "new": issue_key(layout, "new", accept_terms=False),
        "slow": issue_key(layout, "slow", rate_per_s=0.1, burst=1),
        "revoked": issue_key(layout, "revoked"),
    }
    store = SqliteKeyStore(layout.public.root / STATE_DIR / KEYS_DB)
    try:
        store.revoke("revoked")
    finally:
        store.close()
    return keys


def _run_tiers(layout: DeployLayout, kek: str, keys: dict[str, str], wrong: str) -> str:
    env = {**LOUD, "SPLITVAULT_PRIVATE_METRICS_PORT": "0", "SPLITVAULT_PRIVATE_KEK": kek}
    args = ["serve", "private", "--deploy", str(layout.root), "--port", "0"]
    private = start_tier(args, "private_tier_listening", env=env)
    public: TierProcess | None = None
    try:
        public = start_public(layout.root, private.port, env=LOUD)
        _exercise_public(layout, public, keys, wrong)
        _exercise_private(layout, private.port)
        private.stop()
        with https(layout, public.port, keys["good"]) as http:  # the private tier is gone
            assert http.post(INFER, json=BODY).status_code == 503
            assert http.get("/v2/health/ready").status_code == 503
    finally:
        if public is not None:
            public.stop()
        private.stop()
    assert public is not None
    return "\n".join(private.lines + public.lines)


def _exercise_public(
    layout: DeployLayout, public: TierProcess, keys: dict[str, str], wrong: str
) -> None:
    def http(token: str | None = None) -> httpx.Client:
        return https(layout, public.port, token)

    with http(keys["good"]) as good:
        for path in ("/v2/health/live", "/v2/health/ready", "/v2", "/v1/terms"):
            assert good.get(path).status_code == 200
        assert good.get("/metrics").status_code == 404  # on the internal listener only
        assert httpx.get(public.metrics_url, timeout=10).status_code == 200
        assert good.get("/v2/models/digits").status_code == 200
        assert good.post(INFER, json=BODY).status_code == 200
        assert good.post("/v2/models/digits-wm/infer", json=BODY).status_code == 200
        assert good.post(INFER, content=b'{"inputs": [', headers=_json()).status_code == 400
        wrong_shape = {"inputs": [{**BODY["inputs"][0], "shape": [2]}]}
        assert good.post(INFER, json=wrong_shape).status_code == 400
        assert good.post("/v2/models/nope/infer", json=BODY).status_code == 404
        assert good.post(INFER, content=b" " * (17 << 20), headers=_json()).status_code == 413
        assert good.post("/v1/terms/accept", json={"version": "0"}).status_code == 403
        # A key in the URL is not a credential, and no URL is logged.
        assert good.get(f"/v2/models/digits?api_key={keys['good']}").status_code == 200
    credentials = {
        "Bearer " + wrong: 401,
        "Bearer " + keys["revoked"]: 401,
        "Bearer not-a-key": 401,
        "Basic " + base64.b64encode(f"user:{keys['good']}".encode()).decode(): 401,
        keys["good"]: 401,  # no scheme
    }
    with http() as anonymous:
        for authorization, status in credentials.items():
            reply = anonymous.post(INFER, json=BODY, headers={"Authorization": authorization})
            assert reply.status_code == status, (authorization[:12], reply.text)
            assert keys["good"] not in reply.text
    with http(keys["new"]) as new:
        assert new.post(INFER, json=BODY).status_code == 403
        assert new.post("/v1/terms/accept", json={"version": "1"}).status_code == 200
        assert new.post(INFER, json=BODY).status_code == 200
    with http(keys["slow"]) as slow:
        assert [slow.post(INFER, json=BODY).status_code for _ in range(3)] == [200, 429, 429]


def _json() -> dict[str, str]:
    return {"content-type": "application/json"}


def _exercise_private(layout: DeployLayout, port: int) -> None:
    """The private tier's own certificate may check health, not infer: a refused identity."""
    tls = layout.private.tls
    credentials = grpc.ssl_channel_credentials(
        root_certificates=layout.private.ca_cert.read_bytes(),
        private_key=(tls / "server.key").read_bytes(),
        certificate_chain=(tls / "server.crt").read_bytes(),
    )
    options = [("grpc.ssl_target_name_override", PRIVATE_IDENTITY)]
    with grpc.secure_channel(f"127.0.0.1:{port}", credentials, options=options) as channel:
        stub = inference_pb2_grpc.PrivateInferenceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.Infer(inference_pb2.InferRequest(model="digits"), timeout=10)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED


def _failed_start(layout: DeployLayout, bad_kek: str) -> str:
    """A private tier given a malformed KEK refuses to start, saying why but not what."""
    command = [sys.executable, "-m", "splitvault", "serve", "private", "--deploy", str(layout.root)]
    env = {**os.environ, **LOUD, "SPLITVAULT_PRIVATE_KEK": bad_kek}
    done = subprocess.run(
        command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode != 0
    assert "KEK" in done.stderr
    return done.stdout + done.stderr


def test_debug_output_was_produced(exercised: Exercised) -> None:
    """Positive controls: the output is loud, and holds the public identifiers and certs."""
    lines = exercised.output.splitlines()
    assert len(lines) > 1000, len(lines)  # gRPC core tracing is on
    assert any(line.startswith("[_cygrpc]") for line in lines)  # library DEBUG logs
    # gRPC's core writes its trace into the same pipe, sometimes between a JSON line and its
    # newline: take the JSON object each line starts with.
    decoder = json.JSONDecoder()
    events = [decoder.raw_decode(line)[0] for line in lines if line.startswith("{")]
    assert {"terms_accepted", "request_unavailable"} <= {e.get("event") for e in events}
    new_key_id = parse_key_id(exercised.secrets["API key new"])
    assert new_key_id is not None and new_key_id in exercised.output
    found = [line for line in exercised.certificate_lines if line in exercised.output]
    assert found, "no certificate line in the output: the PEM search would find nothing"


def test_no_secret_appears_in_any_output(exercised: Exercised) -> None:
    leaked = {what for what, text in exercised.secrets.items() if text in exercised.output}
    assert not leaked, sorted(leaked)
    assert all(len(text) >= 16 for text in exercised.secrets.values())  # no trivial needles


def test_tracebacks_are_logged_without_local_variables(tmp_path: Path) -> None:
    """A logged exception shows where it happened, never the values its frames held."""
    script = textwrap.dedent(
        """
        from shared.logs import configure_logging, get_logger
        configure_logging("DEBUG", tier="test")
        def unwrap(token):
            data_key = "00112233445566778899aabbccddeeff"
            raise ValueError("cannot unwrap")
        try:
            unwrap("sv_k_00000000_secret-token-value")
        except ValueError:
            get_logger("t").exception("unwrap_failed")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    (event,) = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    assert event["event"] == "unwrap_failed"
    frames = event["exception"][0]["frames"]
    assert [frame["name"] for frame in frames][-1] == "unwrap"
    assert "secret-token-value" not in done.stderr
    assert "00112233445566778899aabbccddeeff" not in done.stderr
