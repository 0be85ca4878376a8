"""Health probes for container healthchecks and operators: ready or not, and why not."""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from protos import inference_pb2, inference_pb2_grpc
from shared.layout import PRIVATE_IDENTITY, DeployLayout


@dataclass(frozen=True)
class Probe:
    """A probe's answer: ready, whether the tier answered at all, and why it is not ready."""

    ready: bool
    answered: bool
    reasons: list[str] = field(default_factory=list)


def probe_private(layout: DeployLayout, address: str, timeout_s: float = 3.0) -> Probe:
    """gRPC health check with the private tier's own certificate (it carries clientAuth); when
    not SERVING, the models that failed to load and why (``ModelStatus``)."""
    tls = layout.private.tls
    credentials = grpc.ssl_channel_credentials(
        root_certificates=layout.private.ca_cert.read_bytes(),
        private_key=(tls / "server.key").read_bytes(),
        certificate_chain=(tls / "server.crt").read_bytes(),
    )
    options = [("grpc.ssl_target_name_override", PRIVATE_IDENTITY)]
    with grpc.secure_channel(address, credentials, options=options) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout_s
            )
        except grpc.RpcError as error:
            return Probe(False, False, [f"no answer from {address}: {_rpc_error(error)}"])
        if reply.status == health_pb2.HealthCheckResponse.SERVING:
            return Probe(True, True)
        return Probe(False, True, _failed_models(channel, timeout_s))


def _failed_models(channel: grpc.Channel, timeout_s: float) -> list[str]:
    """Why a private tier that answered NOT_SERVING is not ready."""
    try:
        reply = inference_pb2_grpc.PrivateInferenceStub(channel).ModelStatus(
            inference_pb2.ModelStatusRequest(), timeout=timeout_s
        )
    except grpc.RpcError as error:
        return [f"NOT_SERVING (model status unavailable: {_rpc_error(error)})"]
    failed = [f"{model.name}: {model.reason}" for model in reply.models if not model.ready]
    if not failed:
        return ["NOT_SERVING with every model loaded (shutting down, or its private store down)"]
    return [f"{len(failed)} model(s) failed to load", *failed]


def _rpc_error(error: grpc.RpcError) -> str:
    code = error.code() if isinstance(error, grpc.Call) else None
    details = error.details() if isinstance(error, grpc.Call) else str(error)
    return f"{code.name if code else 'error'}: {details}"


def probe_public(layout: DeployLayout, url: str, timeout_s: float = 3.0) -> Probe:
    """``GET /v2/health/ready`` over HTTPS, verified with the deployment's CA."""
    context = ssl.create_default_context(cafile=str(layout.public.ca_cert))
    try:
        reply = httpx.get(f"{url.rstrip('/')}/v2/health/ready", verify=context, timeout=timeout_s)
    except httpx.HTTPError as error:
        return Probe(False, False, [f"no answer from {url}: {error}"])
    if reply.status_code == 200:
        return Probe(True, True)
    try:
        reason = str(reply.json().get("error", ""))
    except ValueError:
        reason = ""
    return Probe(False, True, [reason or f"HTTP {reply.status_code}"])


UNSAFE_METRIC = "splitvault_unsafe_setting"


@dataclass(frozen=True)
class PublicHealth:
    """The public tier's readiness and the settings it reports as switching protections off
    (``None`` when its metrics listener did not answer)."""

    probe: Probe
    unsafe: list[tuple[str, str]] | None

    @property
    def ready(self) -> bool:
        """Whether ``/v2/health/ready`` answered 200."""
        return self.probe.ready


def unsafe_settings_at(metrics_url: str, timeout_s: float = 3.0) -> list[tuple[str, str]] | None:
    """(setting, value) pairs of ``splitvault_unsafe_setting`` on a tier's metrics listener."""
    try:
        reply = httpx.get(metrics_url, timeout=timeout_s)
        reply.raise_for_status()
    except httpx.HTTPError:
        return None
    return [
        (sample.labels["setting"], sample.labels["value"])
        for family in text_string_to_metric_families(reply.text)
        for sample in family.samples
        if sample.name == UNSAFE_METRIC and sample.value > 0
    ]


def check_public(
    layout: DeployLayout, url: str, metrics_url: str, timeout_s: float = 3.0
) -> PublicHealth:
    """Readiness over HTTPS, and the unsafe settings from the internal metrics listener."""
    return PublicHealth(
        probe_public(layout, url, timeout_s), unsafe_settings_at(metrics_url, timeout_s)
    )
