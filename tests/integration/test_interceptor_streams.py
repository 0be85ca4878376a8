"""Finding 10: the identity interceptor refuses every handler kind it cannot guard.

Replays the attack on a real gRPC server with the private tier's interceptor and its real
mutual-TLS credentials: a streaming-request RPC registered next to the tier's services was
handed out unguarded, so any certificate from the deployment's CA reached it. Now every call
of such a kind is refused before the handler reads a request, whoever calls.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest

from private_core.auth import IdentityInterceptor, IdentityRule
from private_core.server import server_credentials
from shared.layout import PRIVATE_IDENTITY, PUBLIC_IDENTITY, PUBLIC_REPLICA_PREFIX, DeployLayout
from splitvault.deploy import init_deployment, load_ca
from splitvault.pki import issue_certificate

SERVICE = "splitvault.test.Probe"
TIMEOUT = 10


def _identity(data: bytes) -> bytes:
    return data


CODEC = (_identity, _identity)  # request serializer, response deserializer: raw bytes


@dataclass
class Probe:
    """Handlers of every kind that note which of them ran."""

    ran: list[str] = field(default_factory=list)

    async def unary(self, request: bytes, _context: Any) -> bytes:
        self.ran.append("unary_unary")
        return request

    async def stream_unary(self, requests: AsyncIterator[bytes], _context: Any) -> bytes:
        self.ran.append("stream_unary")
        return b"".join([item async for item in requests])

    async def stream_stream(
        self, requests: AsyncIterator[bytes], _context: Any
    ) -> AsyncIterator[bytes]:
        self.ran.append("stream_stream")
        async for item in requests:
            yield item

    def handler(self) -> grpc.GenericRpcHandler[Any, Any]:
        codec: dict[str, Any] = {
            "request_deserializer": _identity,
            "response_serializer": _identity,
        }
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Unary": grpc.unary_unary_rpc_method_handler(self.unary, **codec),
                "Collect": grpc.stream_unary_rpc_method_handler(self.stream_unary, **codec),
                "Chat": grpc.stream_stream_rpc_method_handler(self.stream_stream, **codec),
            },
        )


@dataclass(frozen=True)
class Identity:
    cert: bytes
    key: bytes


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> DeployLayout:
    """A deployment's CA and tier certificates (no models needed)."""
    return init_deployment(tmp_path_factory.mktemp("interceptor") / "d")


@pytest.fixture(scope="module")
def identities(layout: DeployLayout) -> dict[str, Identity]:
    tls = layout.public.tls
    intruder = issue_certificate(load_ca(layout), "intruder", server=False, client=True)
    return {
        "public": Identity((tls / "client.crt").read_bytes(), (tls / "client.key").read_bytes()),
        "intruder": Identity(intruder.cert_pem(), intruder.key_pem()),
    }


async def _serve(layout: DeployLayout, probe: Probe) -> tuple[grpc.aio.Server, int]:
    public = IdentityRule(frozenset([PUBLIC_IDENTITY]), (PUBLIC_REPLICA_PREFIX,))
    server = grpc.aio.server(interceptors=[IdentityInterceptor(public, public)])
    server.add_generic_rpc_handlers([probe.handler()])
    port = server.add_secure_port("127.0.0.1:0", server_credentials(layout.private))
    await server.start()
    return server, port


def _channel(layout: DeployLayout, port: int, identity: Identity) -> grpc.aio.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=layout.public.ca_cert.read_bytes(),
        private_key=identity.key,
        certificate_chain=identity.cert,
    )
    options = [
        ("grpc.ssl_target_name_override", PRIVATE_IDENTITY),
        ("grpc.use_local_subchannel_pool", 1),
    ]
    return grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials, options=options)


async def _code(call: Any) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as error:
        code: grpc.StatusCode = error.code()
        return code
    return grpc.StatusCode.OK


async def _streaming_code(call: Any) -> grpc.StatusCode:
    """The status of a streaming-request call that closes its side without a request.

    A request written while the server refuses the call races the refusal: about 1 call in 20
    then ends "Internal error from Core" on the client. Writing none keeps the check exact; the
    refusal never waits for a request anyway.
    """
    with contextlib.suppress(grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
        await call.done_writing()
    code: grpc.StatusCode = await call.code()
    return code


@pytest.mark.parametrize("caller", ["public", "intruder"])
async def test_streaming_request_rpcs_are_refused_for_every_caller(
    layout: DeployLayout, identities: dict[str, Identity], caller: str
) -> None:
    probe = Probe()
    server, port = await _serve(layout, probe)
    try:
        async with _channel(layout, port, identities[caller]) as channel:
            collect = channel.stream_unary(f"/{SERVICE}/Collect", *CODEC)(None, timeout=TIMEOUT)
            chat = channel.stream_stream(f"/{SERVICE}/Chat", *CODEC)(None, timeout=TIMEOUT)
            codes = {
                "stream_unary": await _streaming_code(collect),
                "stream_stream": await _streaming_code(chat),
            }
            unary = channel.unary_unary(f"/{SERVICE}/Unary", *CODEC)(b"x", timeout=TIMEOUT)
            unary_code = await _code(unary)
    finally:
        await server.stop(None)
    assert codes == {
        "stream_unary": grpc.StatusCode.PERMISSION_DENIED,
        "stream_stream": grpc.StatusCode.PERMISSION_DENIED,
    }
    # The guard still admits the allowed identity to what it can guard, and only that.
    expected = grpc.StatusCode.OK if caller == "public" else grpc.StatusCode.PERMISSION_DENIED
    assert unary_code == expected
    assert probe.ran == (["unary_unary"] if caller == "public" else [])
