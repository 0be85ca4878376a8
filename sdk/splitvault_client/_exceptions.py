"""Errors the client raises, each mapped once from an HTTP status in ``ERROR_BY_STATUS``.

    SplitVaultClientError          any other status, or a problem with no better class
    ├── BadRequest           400, 413
    ├── Unauthorized         401
    ├── Forbidden            403  (for example, terms of use not accepted)
    ├── ModelNotFound        404
    ├── RateLimited          429  (``retry_after`` from the Retry-After header)
    ├── Unavailable          503, or the server could not be reached (refused, reset)
    │   └── Timeout          no connection or no answer within the client's ``timeout``
    ├── TLSError             TLS could not be set up: a configuration error, never retried
    ├── ServerError          500 and every other 5xx
    └── ProtocolError        the server answered something this client cannot read

``status`` is the HTTP error status, or ``None`` when there is none (the server could not be
reached, or its answer could not be read). ``retry_after`` is the server's hint in seconds (set
on 429 and 503 when the server sends one); ``headers`` are the error response's headers (empty
without one), for instance ``RateLimit-Policy`` on a 429.
"""

from __future__ import annotations

from collections.abc import Mapping


class SplitVaultClientError(Exception):
    """Base of every error this package raises about a request."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        retry_after: float | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message if status is None else f"{status}: {message}")
        self.message = message
        self.status = status
        self.retry_after = retry_after
        self.headers: Mapping[str, str] = headers if headers is not None else {}


class BadRequest(SplitVaultClientError):
    """The server refused the request's content (400) or size (413)."""


class Unauthorized(SplitVaultClientError):
    """No valid API key was presented (401)."""


class Forbidden(SplitVaultClientError):
    """The caller is known but not allowed, for example before accepting the terms (403)."""


class ModelNotFound(SplitVaultClientError):
    """No model of that name is deployed (404)."""


class RateLimited(SplitVaultClientError):
    """The caller exceeded a rate limit (429); wait ``retry_after`` seconds if set."""


class Unavailable(SplitVaultClientError):
    """The server cannot answer now (503) or could not be reached; retry later."""


class Timeout(Unavailable):
    """No connection, or no answer, within the client's ``timeout``.

    After a read timeout the server may still be working on the request.
    """


class TLSError(SplitVaultClientError):
    """TLS could not be set up: the server's certificate is not trusted by ``ca`` or does not
    name the host, or the server refused this client (``cert``). Fix the configuration: trying
    again will not help."""


class ServerError(SplitVaultClientError):
    """The server failed (500 or another 5xx)."""


class ProtocolError(SplitVaultClientError):
    """The response is not valid Open Inference Protocol v2 JSON."""


ERROR_BY_STATUS: dict[int, type[SplitVaultClientError]] = {
    400: BadRequest,
    413: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: ModelNotFound,
    429: RateLimited,
    503: Unavailable,
}


def error_for_status(
    status: int,
    message: str,
    *,
    retry_after: float | None = None,
    headers: Mapping[str, str] | None = None,
) -> SplitVaultClientError:
    """Build the error for an HTTP status: the table's class, ``ServerError`` for other 5xx."""
    default = ServerError if 500 <= status <= 599 else SplitVaultClientError
    cls = ERROR_BY_STATUS.get(status, default)
    return cls(message, status=status, retry_after=retry_after, headers=headers)
