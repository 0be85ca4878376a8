"""Health probes for container healthchecks: light imports, exit status only."""

from __future__ import annotations

import ssl
from dataclasses import dataclass

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from shared.layout import PRIVATE_IDENTITY, DeployLayout


def probe_private(layout: DeployLayout, address: str, timeout_s: float = 3.0) -> bool:
    """gRPC health check with the private tier's own certificate (it carries clientAuth)."""
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
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def probe_public(layout: DeployLayout, url: str, timeout_s: float = 3.0) -> bool:
    """``GET /v2/health/ready`` over HTTPS, verified with the deployment's CA."""
    context = ssl.create_default_context(cafile=str(layout.public.ca_cert))
    try:
        reply = httpx.get(f"{url.rstrip('/')}/v2/health/ready", verify=context, timeout=timeout_s)
    except httpx.HTTPError:
        return False
    return reply.status_code == 200


UNSAFE_METRIC = "splitvault_unsafe_setting"


@dataclass(frozen=True)
class PublicHealth:
    """The public tier's readiness and the settings it reports as switching protections off
    (``None`` when its metrics listener did not answer)."""

    ready: bool
    unsafe: list[tuple[str, str]] | None


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
