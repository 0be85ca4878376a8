"""The private tier answers only the public tier's certificate, over mutual TLS, from its own CA.

Each test dials the running private tier with a real gRPC channel and real certificates: the
TLS layer refuses plaintext, missing, foreign, expired and not-yet-valid certificates; the
identity check refuses a valid certificate of another name.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos import inference_pb2, inference_pb2_grpc
from shared.layout import PRIVATE_IDENTITY, PUBLIC_IDENTITY
from splitvault.deploy import load_ca
from splitvault.pki import CertKeyPair, create_ca, issue_certificate
from tests.conftest import DigitsFixture, Tiers
from tests.support.processes import wait_for
from tests.support.stack import image_request

pytestmark = pytest.mark.slow

TIMEOUT = 5
# Refused at the TLS handshake: the client sees no answer at all.
REFUSED = grpc.StatusCode.UNAVAILABLE

Connect = Callable[["ClientIdentity"], grpc.Channel]


@dataclass(frozen=True)
class ClientIdentity:
    """PEM bytes a client presents (no key and certificate: no client certificate)."""

    cert: bytes | None = None
    key: bytes | None = None

    @classmethod
    def of(cls, pair: CertKeyPair) -> ClientIdentity:
        return cls(pair.cert_pem(), pair.key_pem())


@pytest.fixture(scope="module")
def ca_pem(tiers: Tiers) -> bytes:
    return tiers.deployment.layout.public.ca_cert.read_bytes()


@pytest.fixture(scope="module")
def deployment_ca(tiers: Tiers) -> CertKeyPair:
    return load_ca(tiers.deployment.layout)


def _channel(tiers: Tiers, ca_pem: bytes, identity: ClientIdentity) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca_pem, private_key=identity.key, certificate_chain=identity.cert
    )
    # A local subchannel pool: every channel makes its own handshake with its own certificate.
    options = [
        ("grpc.ssl_target_name_override", PRIVATE_IDENTITY),
        ("grpc.use_local_subchannel_pool", 1),
    ]
    return grpc.secure_channel(tiers.private_address, credentials, options=options)


@pytest.fixture
def connect(tiers: Tiers, ca_pem: bytes) -> Iterator[Connect]:
    """``connect(identity)`` opens a channel that is closed after the test."""
    opened: list[grpc.Channel] = []

    def open_channel(identity: ClientIdentity) -> grpc.Channel:
        opened.append(_channel(tiers, ca_pem, identity))
        return opened[-1]

    yield open_channel
    for channel in opened:
        channel.close()


def _status(channel: grpc.Channel) -> inference_pb2.ModelStatusResponse:
    stub = inference_pb2_grpc.PrivateInferenceStub(channel)
    return stub.ModelStatus(inference_pb2.ModelStatusRequest(), timeout=TIMEOUT)


def _infer(channel: grpc.Channel) -> inference_pb2.InferResponse:
    stub = inference_pb2_grpc.PrivateInferenceStub(channel)
    return stub.Infer(inference_pb2.InferRequest(model="digits"), timeout=TIMEOUT)


def _infer_batch(channel: grpc.Channel) -> list[inference_pb2.InferBatchReply]:
    stub = inference_pb2_grpc.PrivateInferenceStub(channel)
    batch = inference_pb2.InferBatchRequest(requests=[inference_pb2.InferRequest(model="digits")])
    return list(stub.InferBatch(batch, timeout=TIMEOUT))


def _health(channel: grpc.Channel) -> health_pb2.HealthCheckResponse:
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT)


def _code(call: Callable[[grpc.Channel], object], channel: grpc.Channel) -> grpc.StatusCode:
    """The status code ``call`` fails with (it must fail)."""
    with pytest.raises(grpc.RpcError) as caught:
        call(channel)
    code: grpc.StatusCode = caught.value.code()
    return code


def _public_client(tiers: Tiers) -> ClientIdentity:
    tls = tiers.deployment.layout.public.tls
    return ClientIdentity((tls / "client.crt").read_bytes(), (tls / "client.key").read_bytes())


def test_public_client_certificate_is_served(tiers: Tiers, connect: Connect) -> None:
    channel = connect(_public_client(tiers))
    reply = _status(channel)
    statuses = {model.name: model.ready for model in reply.models}
    assert statuses["digits"] is True
    assert _health(channel).status == health_pb2.HealthCheckResponse.SERVING


def test_plaintext_client_gets_no_answer(tiers: Tiers) -> None:
    with grpc.insecure_channel(
        tiers.private_address, options=[("grpc.use_local_subchannel_pool", 1)]
    ) as channel:
        assert _code(_status, channel) == REFUSED
        assert _code(_health, channel) == REFUSED


def test_tls_client_without_certificate_is_refused(connect: Connect) -> None:
    channel = connect(ClientIdentity())
    assert _code(_status, channel) == REFUSED
    assert _code(_health, channel) == REFUSED


def test_certificate_from_another_ca_is_refused(connect: Connect) -> None:
    other_ca = create_ca("an attacker's CA")
    impostor = issue_certificate(other_ca, PUBLIC_IDENTITY, server=False, client=True)
    channel = connect(ClientIdentity.of(impostor))
    assert _code(_status, channel) == REFUSED
    assert _code(_infer, channel) == REFUSED
    assert _code(_infer_batch, channel) == REFUSED


def test_other_identity_from_the_deployment_ca_is_denied(
    tiers: Tiers, deployment_ca: CertKeyPair, connect: Connect
) -> None:
    intruder = issue_certificate(deployment_ca, "intruder", server=False, client=True)
    channel = connect(ClientIdentity.of(intruder))
    denied = grpc.StatusCode.PERMISSION_DENIED
    assert _code(_infer, channel) == denied
    assert _code(_infer_batch, channel) == denied
    assert _code(_status, channel) == denied
    assert _code(_health, channel) == denied

    def refused() -> bool:
        events = tiers.private.events()
        return any(
            e.get("event") == "caller_refused" and e.get("identities") == ["intruder"]
            for e in events
        )

    wait_for(refused, timeout=10, what="the private tier to log the refusal")


def test_private_identity_may_only_check_health_and_model_status(
    tiers: Tiers, connect: Connect
) -> None:
    tls = tiers.deployment.layout.private.tls
    own = ClientIdentity((tls / "server.crt").read_bytes(), (tls / "server.key").read_bytes())
    channel = connect(own)
    assert _health(channel).status == health_pb2.HealthCheckResponse.SERVING
    assert _code(_infer, channel) == grpc.StatusCode.PERMISSION_DENIED
    assert _code(_infer_batch, channel) == grpc.StatusCode.PERMISSION_DENIED
    # Read-only model status, for `splitvault health private` to say which model failed.
    assert _status(channel).models


@pytest.mark.parametrize(
    ("label", "not_before"),
    [
        ("expired", dt.timedelta(days=-3)),
        ("not yet valid", dt.timedelta(days=1)),
    ],
)
def test_certificate_outside_its_validity_is_refused(
    deployment_ca: CertKeyPair, connect: Connect, label: str, not_before: dt.timedelta
) -> None:
    start = dt.datetime.now(dt.UTC) + not_before
    pair = issue_certificate(
        deployment_ca, PUBLIC_IDENTITY, server=False, client=True, not_before=start, valid_days=1
    )
    now = dt.datetime.now(dt.UTC)
    assert not pair.cert.not_valid_before_utc <= now <= pair.cert.not_valid_after_utc, label
    channel = connect(ClientIdentity.of(pair))
    assert _code(_status, channel) == REFUSED
    assert _code(_infer, channel) == REFUSED
    assert _code(_infer_batch, channel) == REFUSED


def test_private_tier_keeps_serving_after_refusals(
    tiers: Tiers, digits_model: DigitsFixture
) -> None:
    """Runs last in this module: every refused caller above left the private tier healthy."""
    x = digits_model.data.test_x[:3]
    body = image_request(x)
    with tiers.http(timeout=TIMEOUT) as http:
        reply = http.post("/v2/models/digits/infer", json=body)
    assert reply.status_code == 200, "\n".join([reply.text, *tiers.public.lines[-30:]])
    assert reply.json()["outputs"][0]["shape"] == [3, 3]
    assert tiers.private.process.poll() is None
