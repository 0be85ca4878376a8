"""The v2 gRPC ingress's server: TLS with the tier's HTTPS certificate, on its own port.

It runs on the event loop of the REST app (started and stopped by its lifespan), over the same
``PublicState``. Clients authenticate with API keys, not certificates, so no client
certificate is asked for; there is no plain-text port. Its own limits (``max_body_bytes`` a
message, ``max_connections`` calls in flight) are enforced by the servicer, audited; gRPC's
are set ``HARD_CAP_FACTOR`` times higher, as a hard cap (``public_api.grpc_limits``).
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from public_api.grpc_ingress import OpenInferenceServicer, add_to_server
from public_api.grpc_limits import HARD_CAP_FACTOR, InFlight
from public_api.settings import PublicSettings
from public_api.state import PublicState
from shared.layout import TierDir
from shared.logs import get_logger

log = get_logger(__name__)


@dataclass(frozen=True)
class GrpcIngress:
    """A started ingress server and the port it bound."""

    server: grpc.aio.Server
    port: int

    async def stop(self, grace_s: float) -> None:
        """Refuse new calls and let those under way finish for up to ``grace_s``."""
        await self.server.stop(grace_s)


async def start_grpc_ingress(
    settings: PublicSettings, state: PublicState, port: int
) -> GrpcIngress:
    """Bind ``port`` (0: a free one) and serve; logs ``grpc_ingress_listening``."""
    tier = TierDir(settings.tier_dir)
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", HARD_CAP_FACTOR * settings.max_body_bytes),
            ("grpc.max_send_message_length", settings.max_body_bytes),
            ("grpc.so_reuseport", int(settings.reuse_port)),
        ],
        maximum_concurrent_rpcs=HARD_CAP_FACTOR * settings.max_connections,
    )
    servicer = OpenInferenceServicer(
        state, InFlight(settings.max_connections, state.metrics.grpc_calls_in_flight)
    )
    add_to_server(servicer, server, settings.max_body_bytes)
    credentials = grpc.ssl_server_credentials(
        [((tier.tls / "server.key").read_bytes(), (tier.tls / "server.crt").read_bytes())],
        require_client_auth=False,  # callers present API keys (authorization metadata)
    )
    port = server.add_secure_port(f"{settings.host}:{port}", credentials)
    await server.start()
    log.info("grpc_ingress_listening", host=settings.host, port=port)
    return GrpcIngress(server, port)
