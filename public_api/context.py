"""One typed record per HTTP request of what the tier learned about it, for its audit record.

The ASGI middlewares, the connection protocol, the route dependencies and the error handlers
all read and write the same ``RequestContext``, kept once in the request's ASGI scope
(``scope["state"]``, which Starlette exposes as ``request.state``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from shared.errors import (
    KeyBlocked,
    PermissionDenied,
    QuotaExceeded,
    RateLimited,
    SplitVaultError,
    TermsNotAccepted,
    Unauthenticated,
    mapping_for,
)

if TYPE_CHECKING:
    from public_api.protection import Caller

_KEY = "splitvault.request"
# How a request ended without an answer: the tier's read deadline ("timeout") or the client
# went away ("client").
Closed = Literal["timeout", "client"]


@dataclass
class RequestContext:
    """What is known about one request; ``audited`` once its outcome is in the audit trail."""

    client: str
    model: str | None = None  # inference requests: the model named in the path
    caller: Caller | None = None  # set once the API key is checked
    request_id: str | None = None  # the body's ``id``, once parsed
    decision: str | None = None  # the audit decision of a refusal, once an error said why
    audited: bool = False
    overloaded: bool = False  # the connection limit was reached when the request arrived
    closed: Closed | None = None
    # The tensor bytes after the JSON header (binary tensor data extension), once split off.
    binary: memoryview | None = None

    @property
    def inference(self) -> bool:
        """Whether this is an inference request (every outcome of one is audited)."""
        return self.model is not None

    def refused(self, error: SplitVaultError) -> None:
        """Note why the request is refused. (The decision, not the error: an exception keeps
        its frames alive, and with them this context and the connection's buffers.)"""
        self.decision = decision_for(error)

    @classmethod
    def of(cls, scope: Any) -> RequestContext:
        """The request's context, created on first use (``scope``: an ASGI HTTP scope)."""
        state: dict[str, Any] = scope.setdefault("state", {})
        context = state.get(_KEY)
        if context is None:
            client = scope.get("client")
            context = state[_KEY] = cls(client=client[0] if client else "unknown")
        assert isinstance(context, RequestContext)
        return context


_DECISIONS: list[tuple[type[SplitVaultError], str]] = [
    (Unauthenticated, "unauthenticated"),
    (TermsNotAccepted, "terms_required"),
    (KeyBlocked, "blocked"),
    (PermissionDenied, "forbidden"),
    (QuotaExceeded, "quota_exceeded"),
    (RateLimited, "rate_limited"),
]


def decision_for(error: SplitVaultError) -> str:
    """The audit decision of a request refused with ``error``."""
    for cls, name in _DECISIONS:
        if isinstance(error, cls):
            return name
    return decision_for_status(mapping_for(error).http_status)


def decision_for_status(status: int) -> str:
    """The audit decision of a refusal known only by its status (no handler said why)."""
    named = {401: "unauthenticated", 403: "forbidden", 429: "rate_limited", 503: "unavailable"}
    return named.get(status, "bad_request" if status < 500 else "error")
