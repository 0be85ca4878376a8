"""One exception tree for splitvault, each error mapped once to an HTTP status and a gRPC code.

    SplitVaultError
    ├── InvalidInput          400  INVALID_ARGUMENT
    │   └── PayloadTooLarge   413  INVALID_ARGUMENT
    │       └── MessageTooLarge   413  RESOURCE_EXHAUSTED (a gRPC ingress message, as gRPC says it)
    ├── Unauthenticated       401  UNAUTHENTICATED
    │   └── SignatureRefused  401  PERMISSION_DENIED (reason "signature", read back as such)
    ├── PermissionDenied      403  PERMISSION_DENIED
    │   ├── TermsNotAccepted  403
    │   ├── KeyBlocked        403
    │   └── ActivationsRefused 403 (the private tier's activation monitor, one key's stream)
    ├── ModelNotFound         404  NOT_FOUND
    ├── RateLimited           429  RESOURCE_EXHAUSTED
    │   ├── QuotaExceeded     429
    │   └── KeyBudgetExhausted        429  RESOURCE_EXHAUSTED, reason "key_budget"
    ├── Unavailable           503  UNAVAILABLE
    │   ├── ModelNotReady     503  FAILED_PRECONDITION
    │   ├── Overloaded        503  RESOURCE_EXHAUSTED (carries a retry hint)
    │   ├── IdentityBudgetExhausted   503  RESOURCE_EXHAUSTED, reason "identity_budget"
    │   └── DeadlineExceeded  503  DEADLINE_EXCEEDED
    ├── AnchorConflict        409  ALREADY_EXISTS (an audit anchor that contradicts the ledger)
    ├── ModelLoadError       (not served: a model that failed to load)
    └── InternalError         500  INTERNAL

Both tiers read ``ERROR_TABLE``: the REST layer turns an error into its HTTP status, the gRPC
servicer aborts with its code, and the public tier's gRPC client turns a code back into an error.
Where one gRPC code stands for several errors (RESOURCE_EXHAUSTED: the private tier's queue, its
budget per certificate identity, its second-line budget per key), the abort carries a
``reason`` and a retry hint in trailing metadata (``grpc_trailers``) and the code and reason
together name the class read back.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import grpc


class SplitVaultError(Exception):
    """Base of every error splitvault raises on purpose; ``message`` is safe to show a client."""

    def __init__(
        self,
        message: str,
        *,
        retry_after_s: float | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s
        # Extra response headers a transport may send (e.g. RateLimit headers on a 429).
        self.headers = headers or {}


class InvalidInput(SplitVaultError):
    """The request does not match the model's declared inputs."""


class PayloadTooLarge(InvalidInput):
    """The request body or tensor exceeds the configured size limit."""


class MessageTooLarge(PayloadTooLarge):
    """A message to the public tier's v2 gRPC ingress exceeds the size limit (gRPC's own code
    for it, RESOURCE_EXHAUSTED; 413 in the audit trail)."""


class Unauthenticated(SplitVaultError):
    """No valid credential was presented."""


class SignatureRefused(Unauthenticated):
    """A customer request signature is missing where one is required, invalid, stale or
    replayed (``shared.signatures``); the message says which, never key material."""


class PermissionDenied(SplitVaultError):
    """The caller is known but not allowed to do this."""


class TermsNotAccepted(PermissionDenied):
    """The API key has not accepted the current terms of service."""


class KeyBlocked(PermissionDenied):
    """The API key was blocked (suspected model extraction)."""


class ActivationsRefused(PermissionDenied):
    """The private tier's activation monitor refused one API key's stream of activations."""


# The private tier's status details for ``ActivationsRefused``; the public tier reads a
# PERMISSION_DENIED with exactly these details back as that error (403), any other as a
# refusal of its own identity (503).
ACTIVATIONS_REFUSED = "requests of this API key were refused by the private tier's monitor"


class ModelNotFound(SplitVaultError):
    """No model of that name is deployed."""


class RateLimited(SplitVaultError):
    """The caller exceeded a rate limit or quota."""


class QuotaExceeded(RateLimited):
    """The caller used up its daily query quota."""


class KeyBudgetExhausted(RateLimited):
    """The private tier's second-line budget for the API key the public tier named is used up."""


class Unavailable(SplitVaultError):
    """A dependency (the private tier) cannot answer now; retry later."""


class ModelNotReady(Unavailable):
    """The model exists but is not loaded (for example, it failed to decrypt)."""


class Overloaded(Unavailable):
    """The server's queue is full."""


class IdentityBudgetExhausted(Unavailable):
    """The private tier's budget for the calling public replica's identity is used up: a fault
    of the service (or a compromised replica), not of the customer, so 503 and not 429."""


class DeadlineExceeded(Unavailable):
    """The private tier did not answer within the deadline."""


class AnchorConflict(SplitVaultError):
    """An audit anchor contradicts one the private ledger holds (another head, or not forward)."""


class ModelLoadError(SplitVaultError):
    """A model could not be loaded (tampered file, wrong key, bad manifest)."""


class InternalError(SplitVaultError):
    """An unexpected fault; details are logged, never returned."""


@dataclass(frozen=True)
class ErrorMapping:
    """How one error class crosses HTTP and gRPC.

    ``read_back``: a gRPC status with this code from the private tier is read back as this
    class (one class per code). ``peer_message``: the message the client then gets instead of
    the status details, where those may come from the gRPC library rather than the private
    tier (no connection, no answer in time) and could describe the internal network.
    """

    http_status: int
    grpc_code: grpc.StatusCode
    read_back: bool = False
    peer_message: str | None = None
    # Sent with the gRPC status as trailing metadata (``grpc_trailers``): tells apart the
    # classes read back from one code.
    reason: str | None = None


_Code = grpc.StatusCode
ERROR_TABLE: dict[type[SplitVaultError], ErrorMapping] = {
    PayloadTooLarge: ErrorMapping(413, _Code.INVALID_ARGUMENT),
    MessageTooLarge: ErrorMapping(413, _Code.RESOURCE_EXHAUSTED),
    InvalidInput: ErrorMapping(400, _Code.INVALID_ARGUMENT, read_back=True),
    # The private tier's only caller is this tier: its refusals are of our identity.
    Unauthenticated: ErrorMapping(401, _Code.UNAUTHENTICATED, read_back=True),
    PermissionDenied: ErrorMapping(403, _Code.PERMISSION_DENIED, read_back=True),
    SignatureRefused: ErrorMapping(
        401, _Code.PERMISSION_DENIED, read_back=True, reason="signature"
    ),
    # The private tier's activation monitor refusing one key's stream: that key gets 403.
    ActivationsRefused: ErrorMapping(
        403,
        _Code.PERMISSION_DENIED,
        read_back=True,
        peer_message=ACTIVATIONS_REFUSED,
        reason="activations",
    ),
    ModelNotFound: ErrorMapping(404, _Code.NOT_FOUND, read_back=True),
    # The public tier's own limits; from the private tier, RESOURCE_EXHAUSTED is its queue
    # (no reason) or one of its admission budgets (reason in trailing metadata).
    RateLimited: ErrorMapping(429, _Code.RESOURCE_EXHAUSTED),
    KeyBudgetExhausted: ErrorMapping(
        429, _Code.RESOURCE_EXHAUSTED, read_back=True, reason="key_budget"
    ),
    IdentityBudgetExhausted: ErrorMapping(
        503, _Code.RESOURCE_EXHAUSTED, read_back=True, reason="identity_budget"
    ),
    ModelNotReady: ErrorMapping(503, _Code.FAILED_PRECONDITION, read_back=True),
    Overloaded: ErrorMapping(503, _Code.RESOURCE_EXHAUSTED, read_back=True),
    DeadlineExceeded: ErrorMapping(
        503,
        _Code.DEADLINE_EXCEEDED,
        read_back=True,
        peer_message="the private tier did not answer in time",
    ),
    Unavailable: ErrorMapping(
        503, _Code.UNAVAILABLE, read_back=True, peer_message="the private tier is unreachable"
    ),
    ModelLoadError: ErrorMapping(503, _Code.FAILED_PRECONDITION),
    AnchorConflict: ErrorMapping(409, _Code.ALREADY_EXISTS, read_back=True),
    InternalError: ErrorMapping(
        500, _Code.INTERNAL, read_back=True, peer_message="internal error in the private tier"
    ),
}
IDENTITY_REFUSED = "private tier refused this tier's identity"
REASON_KEY = "splitvault-reason"
RETRY_AFTER_KEY = "splitvault-retry-after-s"
MAX_RETRY_AFTER_S = 86_400.0


def _read_back_table() -> dict[tuple[grpc.StatusCode, str | None], type[SplitVaultError]]:
    """(gRPC code, reason) -> the class marked ``read_back`` in ``ERROR_TABLE`` (exactly one)."""
    table: dict[tuple[grpc.StatusCode, str | None], type[SplitVaultError]] = {}
    for cls, mapping in ERROR_TABLE.items():
        if mapping.read_back:
            key = (mapping.grpc_code, mapping.reason)
            if key in table:
                raise AssertionError(f"two classes read back from {key}")
            table[key] = cls
    return table


FROM_GRPC = _read_back_table()


def mapping_for(error: SplitVaultError | type[SplitVaultError]) -> ErrorMapping:
    """The mapping of the most specific class in ``ERROR_TABLE`` that ``error`` is."""
    cls = error if isinstance(error, type) else type(error)
    for base in cls.__mro__:
        if base in ERROR_TABLE:
            return ERROR_TABLE[base]
    return ERROR_TABLE[InternalError]


def grpc_trailers(error: SplitVaultError) -> tuple[tuple[str, str], ...]:
    """Trailing metadata for aborting with ``error``: its table ``reason`` and retry hint."""
    reason = mapping_for(error).reason
    if reason is None:
        return ()
    trailers = [(REASON_KEY, reason)]
    if error.retry_after_s is not None:
        trailers.append((RETRY_AFTER_KEY, f"{error.retry_after_s:.3f}"))
    return tuple(trailers)


def error_from_grpc(
    code: grpc.StatusCode,
    details: str,
    trailers: Sequence[tuple[str, str | bytes]] = (),
) -> SplitVaultError:
    """The error for a status received from the private tier, by ``FROM_GRPC``.

    A status sent with a ``reason`` of the table and its code is read back as that class, with
    the private tier's message (a customer's bad signature: 401; the activation monitor's
    refusal of one key: 403). Any other refusal of the caller (UNAUTHENTICATED,
    PERMISSION_DENIED) is a refusal of this tier's certificate identity: the client gets 503
    without the details. A code the table does not read back is an internal error.
    ``trailers``: the status's trailing metadata (``reason`` and retry hint, see
    ``grpc_trailers``).
    """
    values = {key: value for key, value in trailers if isinstance(value, str)}
    reason = values.get(REASON_KEY)
    cls = FROM_GRPC.get((code, reason)) if reason is not None else None
    by_reason = cls is not None
    cls = cls or FROM_GRPC.get((code, None))
    if cls is None:
        return InternalError(f"private tier: unexpected status {code.name}")
    if not by_reason and issubclass(cls, Unauthenticated | PermissionDenied):
        return Unavailable(IDENTITY_REFUSED, retry_after_s=5.0)
    mapping = ERROR_TABLE[cls]
    retry_after_s = _retry_hint(values.get(RETRY_AFTER_KEY))
    if issubclass(cls, Unavailable):
        message = mapping.peer_message or f"private tier: {details}"
        return cls(message, retry_after_s=retry_after_s or 1.0)
    return cls(mapping.peer_message or details, retry_after_s=retry_after_s)


def _retry_hint(text: str | None) -> float | None:
    """A retry hint from trailing metadata, bounded to (0, one day]; None when absent or bad."""
    try:
        seconds = float(text) if text is not None else math.nan
    except ValueError:
        return None
    return min(seconds, MAX_RETRY_AFTER_S) if seconds > 0 else None
