"""One exception tree for splitvault, each error mapped once to an HTTP status and a gRPC code.

    SplitVaultError
    ├── InvalidInput          400  INVALID_ARGUMENT
    │   └── PayloadTooLarge   413  INVALID_ARGUMENT
    ├── Unauthenticated       401  UNAUTHENTICATED
    ├── PermissionDenied      403  PERMISSION_DENIED
    │   ├── TermsNotAccepted  403
    │   ├── KeyBlocked        403
    │   └── ActivationsRefused 403 (the private tier's activation monitor, one key's stream)
    ├── ModelNotFound         404  NOT_FOUND
    ├── RateLimited           429  RESOURCE_EXHAUSTED
    │   └── QuotaExceeded     429
    ├── Unavailable           503  UNAVAILABLE
    │   ├── ModelNotReady     503  FAILED_PRECONDITION
    │   ├── Overloaded        503  RESOURCE_EXHAUSTED (carries a retry hint)
    │   └── DeadlineExceeded  503  DEADLINE_EXCEEDED
    ├── ModelLoadError       (not served: a model that failed to load)
    └── InternalError         500  INTERNAL

Both tiers read ``ERROR_TABLE``: the REST layer turns an error into its HTTP status, the gRPC
servicer aborts with its code, and the public tier's gRPC client turns a code back into an error.
"""

from __future__ import annotations

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


class Unauthenticated(SplitVaultError):
    """No valid credential was presented."""


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


class Unavailable(SplitVaultError):
    """A dependency (the private tier) cannot answer now; retry later."""


class ModelNotReady(Unavailable):
    """The model exists but is not loaded (for example, it failed to decrypt)."""


class Overloaded(Unavailable):
    """The server's queue is full."""


class DeadlineExceeded(Unavailable):
    """The private tier did not answer within the deadline."""


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


_Code = grpc.StatusCode
ERROR_TABLE: dict[type[SplitVaultError], ErrorMapping] = {
    PayloadTooLarge: ErrorMapping(413, _Code.INVALID_ARGUMENT),
    InvalidInput: ErrorMapping(400, _Code.INVALID_ARGUMENT, read_back=True),
    # The private tier's only caller is this tier: its refusals are of our identity.
    Unauthenticated: ErrorMapping(401, _Code.UNAUTHENTICATED, read_back=True),
    PermissionDenied: ErrorMapping(403, _Code.PERMISSION_DENIED, read_back=True),
    ActivationsRefused: ErrorMapping(403, _Code.PERMISSION_DENIED),
    ModelNotFound: ErrorMapping(404, _Code.NOT_FOUND, read_back=True),
    # Rate limits live in the public tier: RESOURCE_EXHAUSTED from the private tier is its queue.
    RateLimited: ErrorMapping(429, _Code.RESOURCE_EXHAUSTED),
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
    InternalError: ErrorMapping(
        500, _Code.INTERNAL, read_back=True, peer_message="internal error in the private tier"
    ),
}
IDENTITY_REFUSED = "private tier refused this tier's identity"


def _read_back_table() -> dict[grpc.StatusCode, type[SplitVaultError]]:
    """gRPC code -> the class marked ``read_back`` in ``ERROR_TABLE`` (exactly one per code)."""
    table: dict[grpc.StatusCode, type[SplitVaultError]] = {}
    for cls, mapping in ERROR_TABLE.items():
        if mapping.read_back:
            if mapping.grpc_code in table:
                raise AssertionError(f"two classes read back from {mapping.grpc_code.name}")
            table[mapping.grpc_code] = cls
    return table


FROM_GRPC = _read_back_table()


def mapping_for(error: SplitVaultError | type[SplitVaultError]) -> ErrorMapping:
    """The mapping of the most specific class in ``ERROR_TABLE`` that ``error`` is."""
    cls = error if isinstance(error, type) else type(error)
    for base in cls.__mro__:
        if base in ERROR_TABLE:
            return ERROR_TABLE[base]
    return ERROR_TABLE[InternalError]


def error_from_grpc(code: grpc.StatusCode, details: str) -> SplitVaultError:
    """The error for a status received from the private tier, by ``FROM_GRPC``.

    A refusal of the caller (UNAUTHENTICATED, PERMISSION_DENIED) is a refusal of this tier's
    certificate identity: the client gets 503 without the details; except the activation
    monitor's refusal of one key (``ACTIVATIONS_REFUSED``), which that key gets as a 403. A code the table does not
    read back is an internal error.
    """
    cls = FROM_GRPC.get(code)
    if cls is None:
        return InternalError(f"private tier: unexpected status {code.name}")
    if cls is PermissionDenied and details == ACTIVATIONS_REFUSED:
        return ActivationsRefused(ACTIVATIONS_REFUSED)
    if issubclass(cls, Unauthenticated | PermissionDenied):
        return Unavailable(IDENTITY_REFUSED, retry_after_s=5.0)
    mapping = ERROR_TABLE[cls]
    if issubclass(cls, Unavailable):
        return cls(mapping.peer_message or f"private tier: {details}", retry_after_s=1.0)
    return cls(mapping.peer_message or details)
