"""Authorise callers by their client-certificate identity, after the mTLS handshake.

The TLS layer already checked that the certificate chains to the private CA; this interceptor
checks *who* it is: only the public tier's identities may call inference (named, or by a prefix:
each public replica has its own, ``splitvault-public-1``, ``-2``, ...), and the health service
also admits the private tier's own identity (its container healthcheck). It guards handlers
with a single request (unary-unary, unary-stream); any other kind of handler is refused for
every caller, so a streaming-request RPC registered later cannot bypass the check.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc

from shared.errors import PermissionDenied, SplitVaultError, mapping_for
from shared.logs import get_logger

log = get_logger(__name__)
HEALTH_PREFIX = "/grpc.health.v1.Health/"
# Read-only model status (names, ready, reasons): also for the health identities, so that
# `splitvault health private` can say which model failed and why.
MODEL_STATUS_METHOD = "/splitvault.v1.PrivateInference/ModelStatus"
Handler = Any  # grpc.RpcMethodHandler; the stubs type it for the sync API only


def peer_identities(context: grpc.aio.ServicerContext[Any, Any]) -> list[str]:
    """Common names of the verified client certificate."""
    auth = context.auth_context()
    return [value.decode("utf-8", "replace") for value in auth.get("x509_common_name", [])]


@dataclass(frozen=True)
class IdentityRule:
    """Certificate CNs admitted: these ``names``, and any name that starts with a ``prefix``.

    Only the deployment's own CA issues the certificates the TLS layer accepts, so a prefix
    admits exactly the replicas the operator issued (``splitvault certs add-public``).
    """

    names: frozenset[str]
    prefixes: tuple[str, ...] = ()

    @classmethod
    def of(cls, rule: IdentityRule | Collection[str]) -> IdentityRule:
        """``rule`` itself, or a rule admitting exactly the names given."""
        return rule if isinstance(rule, IdentityRule) else cls(frozenset(rule))

    def __or__(self, other: IdentityRule) -> IdentityRule:
        """A rule admitting whom either rule admits."""
        prefixes = self.prefixes + tuple(p for p in other.prefixes if p not in self.prefixes)
        return IdentityRule(self.names | other.names, prefixes)

    def match(self, identities: Iterable[str]) -> str | None:
        """The first of ``identities`` this rule admits, or None."""
        for name in identities:
            if name in self.names or any(name.startswith(p) for p in self.prefixes if p):
                return name
        return None


class IdentityInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Refuse any RPC whose client certificate is not an allowed identity for that method."""

    def __init__(
        self,
        allowed: IdentityRule | Collection[str],
        health_allowed: IdentityRule | Collection[str],
    ) -> None:
        self._allowed = IdentityRule.of(allowed)
        self._health_allowed = IdentityRule.of(health_allowed)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler: Handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        allowed = self._health_allowed if method.startswith(HEALTH_PREFIX) else self._allowed
        if method == MODEL_STATUS_METHOD:
            allowed = self._allowed | self._health_allowed
        return _guarded(handler, allowed, method)


async def _abort(context: grpc.aio.ServicerContext[Any, Any], error: SplitVaultError) -> None:
    """End the call with the error's code from ``ERROR_TABLE``."""
    await context.abort(mapping_for(error).grpc_code, error.message)


def _guarded(handler: Handler, allowed: IdentityRule, method: str) -> Any:
    async def check(context: grpc.aio.ServicerContext[Any, Any]) -> None:
        names = peer_identities(context)
        if allowed.match(names) is None:
            log.warning("caller_refused", method=method, identities=names, peer=context.peer())
            await _abort(context, PermissionDenied("client identity not allowed"))

    kinds: Mapping[str, Callable[..., Any]] = {
        "unary_unary": grpc.unary_unary_rpc_method_handler,
        "unary_stream": grpc.unary_stream_rpc_method_handler,
    }
    if handler.unary_unary is not None:
        inner = handler.unary_unary

        async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            await check(context)
            return await inner(request, context)

        wrapped, kind = unary, "unary_unary"
    elif handler.unary_stream is not None:
        inner_stream = handler.unary_stream

        async def stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            await check(context)
            result: Any = inner_stream(request, context)
            if inspect.isasyncgen(result):
                async for item in result:
                    yield item
            else:  # a handler that writes with context.write()
                await result

        wrapped, kind = stream, "unary_stream"
    else:
        return _refused(handler, method)
    return kinds[kind](
        wrapped,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def _refused(handler: Handler, method: str) -> Any:
    """A handler of the same kind that refuses every call before reading any request."""

    async def refuse(_requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        log.warning("rpc_kind_refused", method=method, peer=context.peer())
        await _abort(context, PermissionDenied("streaming requests are not served"))

    make: Callable[..., Any] = grpc.unary_unary_rpc_method_handler
    if handler.stream_unary is not None:
        make = grpc.stream_unary_rpc_method_handler
    elif handler.stream_stream is not None:
        make = grpc.stream_stream_rpc_method_handler
    return make(
        refuse,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
