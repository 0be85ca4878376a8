"""Health probes for container healthchecks: light imports, exit status only."""

from __future__ import annotations

import ssl

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

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
