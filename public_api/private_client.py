"""The public tier's client of the private tier: one reused mTLS channel, deadlines, health."""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos import inference_pb2, inference_pb2_grpc
from public_api.settings import PublicSettings
from shared.errors import SplitVaultError, error_from_grpc
from shared.layout import TierDir

_SERVICE_CONFIG = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})


@dataclass(frozen=True)
class BackStatus:
    """A back stage as the private tier reports it: loaded or why not (for operators), and
    its pairing id ('' when not loaded or packed without one)."""

    ready: bool
    reason: str
    pairing_id: str


def channel_target(addresses: list[str]) -> str:
    """A gRPC target for one address, or a round-robin list of IP addresses."""
    if len(addresses) == 1:
        return addresses[0]
    hosts = [address.rpartition(":")[0].strip("[]") for address in addresses]
    try:
        versions = {ipaddress.ip_address(host).version for host in hosts}
    except ValueError:
        raise ValueError(
            "several private addresses must be IP literals; use one DNS name"
        ) from None
    scheme = "ipv4" if versions == {4} else "ipv6"
    return f"{scheme}:{','.join(addresses)}"


class PrivateTierClient:
    """Calls ``splitvault.v1.PrivateInference`` over mutual TLS with the public identity."""

    def __init__(self, settings: PublicSettings, max_message_bytes: int | None = None) -> None:
        """``max_message_bytes``: the largest request it may send (default: the setting)."""
        tier = TierDir(settings.tier_dir)
        credentials = grpc.ssl_channel_credentials(
            root_certificates=tier.ca_cert.read_bytes(),
            private_key=(settings.client_tls / "client.key").read_bytes(),
            certificate_chain=(settings.client_tls / "client.crt").read_bytes(),
        )
        limit = max_message_bytes or settings.max_message_mb * 1024 * 1024
        self._channel = grpc.aio.secure_channel(
            channel_target(settings.private_addresses),
            credentials,
            options=[
                ("grpc.ssl_target_name_override", settings.private_server_name),
                ("grpc.max_send_message_length", limit),
                ("grpc.max_receive_message_length", limit),
                ("grpc.service_config", _SERVICE_CONFIG),
                ("grpc.initial_reconnect_backoff_ms", 200),
                ("grpc.max_reconnect_backoff_ms", 2000),
                ("grpc.keepalive_time_ms", 30000),
            ],
        )
        self._stub = inference_pb2_grpc.PrivateInferenceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._ledger = inference_pb2_grpc.PrivateLedgerStub(self._channel)
        self._timeout = settings.request_timeout_s

    async def infer(self, request: inference_pb2.InferRequest) -> inference_pb2.InferResponse:
        """Send one request; map any failure to a ``SplitVaultError``."""
        try:
            response: inference_pb2.InferResponse = await self._stub.Infer(
                request, timeout=self._timeout
            )
        except grpc.aio.AioRpcError as error:
            raise _mapped(error) from None
        return response

    async def anchor_audit(
        self, request: inference_pb2.AnchorRequest
    ) -> inference_pb2.AnchorReceipt:
        """Ask the private tier to anchor an audit chain's head; its signed receipt."""
        try:
            receipt: inference_pb2.AnchorReceipt = await self._ledger.AnchorAudit(
                request, timeout=self._timeout
            )
        except grpc.aio.AioRpcError as error:
            mapped = _mapped(error)
            # For the operator's log only (never sent to a client): what the private tier said.
            mapped.message = f"{mapped.message} ({error.code().name}: {error.details()})"
            raise mapped from None
        return receipt

    async def model_status(self, model: str = "") -> dict[str, BackStatus]:
        """Model name -> its back stage's status as the private tier reports it."""
        try:
            reply = await self._stub.ModelStatus(
                inference_pb2.ModelStatusRequest(model=model), timeout=self._timeout
            )
        except grpc.aio.AioRpcError as error:
            raise _mapped(error) from None
        return {
            status.name: BackStatus(status.ready, status.reason, status.pairing_id)
            for status in reply.models
        }

    async def serving(self, timeout_s: float = 1.0) -> bool:
        """Whether the private tier's health service reports SERVING."""
        try:
            reply = await self._health.Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout_s
            )
        except grpc.aio.AioRpcError:
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    async def close(self) -> None:
        """Close the channel."""
        await self._channel.close(grace=None)


def _mapped(error: grpc.aio.AioRpcError) -> SplitVaultError:
    """The call's status as an error, by the one table (``shared.errors.FROM_GRPC``)."""
    metadata: Any = error.trailing_metadata() or ()  # grpc.aio.Metadata: (key, value) pairs
    trailers = [(str(key), value) for key, value in metadata]
    return error_from_grpc(error.code(), error.details() or "", trailers)
