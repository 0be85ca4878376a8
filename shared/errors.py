"""One exception tree for splitvault, each error mapped once to an HTTP status and a gRPC code.

    SplitVaultError
    ├── InvalidInput          400  INVALID_ARGUMENT
    │   └── PayloadTooLarge   413  INVALID_ARGUMENT
    ├── Unauthenticated       401  UNAUTHENTICATED
    ├── PermissionDenied      403  PERMISSION_DENIED
    │   ├── TermsNotAccepted  403
    │   └── KeyBlocked        403
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
    """How one error class crosses HTTP and gRPC."""

    http_status: int
    grpc_code: grpc.StatusCode


ERROR_TABLE: dict[type[SplitVaultError], ErrorMapping] = {
    PayloadTooLarge: ErrorMapping(413, grpc.StatusCode.INVALID_ARGUMENT),
    InvalidInput: ErrorMapping(400, grpc.StatusCode.INVALID_ARGUMENT),
    Unauthenticated: ErrorMapping(401, grpc.StatusCode.UNAUTHENTICATED),
    PermissionDenied: ErrorMapping(403, grpc.StatusCode.PERMISSION_DENIED),
    ModelNotFound: ErrorMapping(404, grpc.StatusCode.NOT_FOUND),
    RateLimited: ErrorMapping(429, grpc.StatusCode.RESOURCE_EXHAUSTED),
    ModelNotReady: ErrorMapping(503, grpc.StatusCode.FAILED_PRECONDITION),
    Overloaded: ErrorMapping(503, grpc.StatusCode.RESOURCE_EXHAUSTED),
    DeadlineExceeded: ErrorMapping(503, grpc.StatusCode.DEADLINE_EXCEEDED),
    Unavailable: ErrorMapping(503, grpc.StatusCode.UNAVAILABLE),
    ModelLoadError: ErrorMapping(503, grpc.StatusCode.FAILED_PRECONDITION),
    InternalError: ErrorMapping(500, grpc.StatusCode.INTERNAL),
}

# Codes the private tier sends, read back into errors by the public tier. RESOURCE_EXHAUSTED
# from the private tier means its queue is full (rate limits live in the public tier).
_FROM_GRPC: dict[grpc.StatusCode, type[SplitVaultError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidInput,
    grpc.StatusCode.NOT_FOUND: ModelNotFound,
    grpc.StatusCode.FAILED_PRECONDITION: ModelNotReady,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Overloaded,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.UNAUTHENTICATED: Unavailable,
    grpc.StatusCode.PERMISSION_DENIED: Unavailable,
}


def mapping_for(error: SplitVaultError) -> ErrorMapping:
    """Return the mapping of the most specific class in ``ERROR_TABLE`` that ``error`` is."""
    for cls in type(error).__mro__:
        if cls in ERROR_TABLE:
            return ERROR_TABLE[cls]
    return ERROR_TABLE[InternalError]


def error_from_grpc(code: grpc.StatusCode, details: str) -> SplitVaultError:
    """Turn a status received from the private tier into the matching error."""
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return Unavailable("private tier refused this tier's identity", retry_after_s=5.0)
    cls = _FROM_GRPC.get(code, InternalError)
    if cls in (Unavailable, DeadlineExceeded, Overloaded, ModelNotReady):
        return cls(f"private tier: {details}", retry_after_s=1.0)
    return cls(details)
