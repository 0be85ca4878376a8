"""The v2 gRPC inference service (``inference.GRPCInferenceService``) of the public tier.

A thin transport over the same core as the REST routes: the API key from ``authorization``
metadata (checked by ``Protection.check_key``, failures charged to the peer's address), then
terms, monitor and audit trail (``Protection.admit``), decoding (``InferenceService.decode``),
and ``serve_inference`` (limits in samples, the answer, the monitor, the audit record). Every
outcome of ``ModelInfer`` is audited once, refusals included. Errors are aborted with the gRPC
code of the one error table; ``RateLimit`` and ``Retry-After`` go back as trailing metadata.
Stock clients cannot sign requests: a key that must sign is refused (PERMISSION_DENIED).
The ingress's own limits on message size and calls in flight (``grpc_limits``) are enforced
here, so that their refusals are audited too.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn

import grpc

from protos import open_inference_pb2 as oip
from public_api.admission import UNNAMED_MODEL, UNREAD_MODEL
from public_api.context import RequestContext
from public_api.grpc_limits import InFlight, MessageGate, Refused
from public_api.grpc_messages import (
    header,
    infer_request,
    infer_response,
    metadata_response,
    peer_address,
)
from public_api.pipeline import serve_inference
from public_api.protection import Caller
from public_api.sealing import GRPC_MODEL_INFER
from public_api.signing import forwarded_signature
from public_api.state import VERSION, PublicState
from shared.errors import InternalError, ModelNotFound, SplitVaultError, grpc_trailers, mapping_for
from shared.logs import get_logger

log = get_logger(__name__)
SERVICE = "inference.GRPCInferenceService"
EXTENSIONS = ["classification"]
_MODEL_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
Context = grpc.aio.ServicerContext[Any, Any]


class OpenInferenceServicer:
    """ServerLive/Ready/Metadata, ModelReady/Metadata and ModelInfer over the tier's state."""

    def __init__(self, state: PublicState, in_flight: InFlight) -> None:
        self.state = state
        self.in_flight = in_flight

    async def server_live(self, _request: oip.ServerLiveRequest, _context: Context) -> Any:
        return oip.ServerLiveResponse(live=True)

    async def server_ready(self, _request: oip.ServerReadyRequest, _context: Context) -> Any:
        serving = bool(self.state.service.stages) and await self.state.private.serving()
        if serving:  # as REST's /v2/health/ready: every model ready in both tiers
            serving = all(model.ready for model in await self.state.models.states())
        return oip.ServerReadyResponse(ready=serving)

    async def server_metadata(self, _request: oip.ServerMetadataRequest, _context: Context) -> Any:
        return oip.ServerMetadataResponse(name="splitvault", version=VERSION, extensions=EXTENSIONS)

    async def model_ready(self, request: oip.ModelReadyRequest, context: Context) -> Any:
        try:
            await self._authenticate(context)
            _check_version(request.name, request.version)
            self.state.service.stage(request.name)  # NOT_FOUND for a model this tier lacks
            ready = (await self.state.models.state(request.name)).ready
        except SplitVaultError as error:
            await abort(context, error)
        return oip.ModelReadyResponse(ready=ready)

    async def model_metadata(self, request: oip.ModelMetadataRequest, context: Context) -> Any:
        try:
            await self._authenticate(context)
            _check_version(request.name, request.version)
            metadata = self.state.service.metadata(request.name)
        except SplitVaultError as error:
            await abort(context, error)
        return metadata_response(metadata)

    async def model_infer(self, request: oip.ModelInferRequest | Refused, context: Context) -> Any:
        outcome = RequestContext(client=peer_address(context.peer()))
        outcome.model = _audited_model(request)
        status, entered = 500, False
        try:
            self.in_flight.enter()
            entered = True
            answer = await self._infer(request, context, outcome)
            status = 200
            return answer
        except SplitVaultError as error:
            outcome.refused(error)
            status = mapping_for(error).http_status
            await abort(context, error)
        except asyncio.CancelledError:  # the client went away (or its deadline passed)
            outcome.closed = "client"
            raise
        except Exception as error:
            log.error("unhandled_error", error=type(error).__name__, detail=str(error)[:300])
            await abort(context, InternalError("internal error"))
        finally:
            if entered:
                self.in_flight.leave()
            if not outcome.audited:
                self.state.protection.record_outcome(outcome, status)

    async def _infer(
        self, request: oip.ModelInferRequest | Refused, context: Context, outcome: RequestContext
    ) -> oip.ModelInferResponse:
        outcome.caller = caller = await self._authenticate(context, outcome.model)
        if isinstance(request, Refused):  # too large or malformed: refused once attributed
            raise request.error
        state, model = self.state, request.model_name
        await state.protection.admit(caller, model)
        _check_version(model, request.model_version)
        body, raw = infer_request(request)
        outcome.request_id = body.id
        decoded = await state.service.decode(model, body, raw)
        protection = state.settings.protection
        signature = forwarded_signature(  # no signature headers: None, or refused if required
            {},
            b"",
            caller.key_id,
            decoded,
            required=caller.key_id in protection.require_signature_keys,
            window_s=protection.signature_window_s,
        )
        # Sealed as the message received (the verifier reads it back: public_api.sealing).
        sealed = request.SerializeToString() if state.sealer is not None else None
        served = await serve_inference(
            state,
            caller,
            decoded,
            signature,
            sealed,
            body.id or "",
            GRPC_MODEL_INFER,
            context=outcome,
        )
        outcome.audited = True
        context.set_trailing_metadata(_metadata(caller.headers))
        return infer_response(served.response)

    async def _authenticate(self, context: Context, model: str | None = None) -> Caller:
        authorization = header(context.invocation_metadata() or (), "authorization")
        client = peer_address(context.peer())
        return await self.state.protection.check_key(authorization, client, model)


def _audited_model(request: oip.ModelInferRequest | Refused) -> str:
    """The model a call is audited under: the one it names, if its message was read."""
    if isinstance(request, Refused):
        return UNREAD_MODEL
    return request.model_name if _MODEL_NAME.match(request.model_name) else UNNAMED_MODEL


def _check_version(model: str, version: str) -> None:
    if version not in ("", "1"):
        raise ModelNotFound(f"model {model!r} has no version {version[:32]!r}; it has '1'")


def _metadata(headers: dict[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple((name.lower(), value) for name, value in headers.items())


async def abort(context: Context, error: SplitVaultError) -> NoReturn:
    """End the call with ``error``'s code from the table, its message and its headers."""
    trailers = grpc_trailers(error) + _metadata(error.headers)
    if error.retry_after_s:
        trailers += (("retry-after", str(max(1, math.ceil(error.retry_after_s)))),)
    await context.abort(mapping_for(error).grpc_code, error.message, trailing_metadata=trailers)
    raise AssertionError("abort returned")  # pragma: no cover - abort always raises


Method = Callable[[Any, Context], Awaitable[Any]]


def _guarded(method: Method, in_flight: InFlight) -> Method:
    """``method`` counted among the calls in flight, its refused messages refused (these
    methods are not audited; ``ModelInfer`` does both itself, audited)."""

    async def guarded(request: Any, context: Context) -> Any:
        try:
            in_flight.enter()
        except SplitVaultError as error:
            await abort(context, error)
        try:
            if isinstance(request, Refused):
                await abort(context, request.error)
            return await method(request, context)
        finally:
            in_flight.leave()

    return guarded


def add_to_server(
    servicer: OpenInferenceServicer, server: grpc.aio.Server, max_message_bytes: int
) -> None:
    """Register ``servicer`` under the v2 service name (the generated code has no servicer: its
    messages live in splitvault's own proto package, see ``protos/open_inference.proto``);
    messages over ``max_message_bytes`` reach the servicer as ``Refused``."""
    methods: dict[str, tuple[Method, type[Any]]] = {
        "ServerLive": (servicer.server_live, oip.ServerLiveRequest),
        "ServerReady": (servicer.server_ready, oip.ServerReadyRequest),
        "ServerMetadata": (servicer.server_metadata, oip.ServerMetadataRequest),
        "ModelReady": (servicer.model_ready, oip.ModelReadyRequest),
        "ModelMetadata": (servicer.model_metadata, oip.ModelMetadataRequest),
        "ModelInfer": (servicer.model_infer, oip.ModelInferRequest),
    }
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(
            method if name == "ModelInfer" else _guarded(method, servicer.in_flight),
            request_deserializer=MessageGate(message.FromString, max_message_bytes),
            response_serializer=lambda reply: reply.SerializeToString(),
        )
        for name, (method, message) in methods.items()
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
