"""What came back from a try, with no I/O: the response, or the error to raise, and whether
to try again. Both clients run ``settle`` and ``RetryPolicy.delay`` on every outcome.

A TLS failure is a configuration error (``TLSError``: the wrong ``ca``, a host the
certificate does not name, a missing client certificate) and is never retried; a timeout is a
``Timeout`` that says which limit ran out; anything else that kept the server from answering is
``Unavailable``.
"""

from __future__ import annotations

import email.utils
import math
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime

import httpx

from ._exceptions import (
    ProtocolError,
    SplitVaultClientError,
    Timeout,
    TLSError,
    Unavailable,
    error_for_status,
)
from ._protocol import Call

Outcome = httpx.Response | httpx.RequestError

_RETRY_STATUS_IDEMPOTENT = frozenset({429, 502, 503, 504})
_RETRY_STATUS_OTHER = frozenset({503})
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
_MAX_ERROR_TEXT = 300
# TLS alerts by which a server refuses the client's certificate (or its absence).
_CLIENT_REFUSED = ("CERTIFICATE_REQUIRED", "BAD_CERTIFICATE", "UNKNOWN_CA", "CERTIFICATE_UNKNOWN")
# The server answered something that is not TLS, or no protocol version both sides speak.
_NOT_TLS = ("WRONG_VERSION_NUMBER", "UNSUPPORTED_PROTOCOL", "NO_PROTOCOLS_AVAILABLE")
_TIMEOUTS: dict[type[httpx.TimeoutException], tuple[str, str]] = {
    httpx.ConnectTimeout: ("connect", "no connection to {host} within {s}"),
    httpx.ReadTimeout: ("read", "{host} sent no answer within {s} (it may still be working)"),
    httpx.WriteTimeout: ("write", "could not send the request to {host} within {s}"),
    httpx.PoolTimeout: ("pool", "no free connection to {host} within {s}"),
}


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to wait before trying a failed call again."""

    retries: int = 0
    backoff: float = 0.2
    max_backoff: float = 30.0

    def delay(self, call: Call, attempt: int, outcome: Outcome) -> float | None:
        """Seconds to wait before try ``attempt + 1`` (0-based), or ``None`` to give up.

        The server's Retry-After hint wins over exponential backoff; both are capped.
        """
        if attempt >= self.retries or not retryable(call, outcome):
            return None
        hint = None
        if isinstance(outcome, httpx.Response):
            hint = parse_retry_after(outcome.headers.get("Retry-After"))
        wait = self.backoff * 2**attempt if hint is None else hint
        return min(wait, self.max_backoff)


def settle(call: Call, outcome: Outcome) -> httpx.Response | SplitVaultClientError:
    """The response if ``call`` got an answer, else the error it amounts to."""
    if isinstance(outcome, httpx.RequestError):
        return request_error(outcome)
    if outcome.status_code in call.accept:
        return outcome
    return error_from_response(outcome)


def retryable(call: Call, outcome: Outcome) -> bool:
    """Whether trying ``call`` again may help and cannot run it twice against the caller's will.

    GETs are repeated after any transport failure or a 429/502/503/504; other calls only after
    a 503 or a failure to connect (the request was never sent). A TLS failure would happen
    again, so it is never retried.
    """
    if isinstance(outcome, httpx.Response):
        allowed = _RETRY_STATUS_IDEMPOTENT if call.idempotent else _RETRY_STATUS_OTHER
        return outcome.status_code in allowed
    if not isinstance(outcome, httpx.TransportError) or tls_failure(outcome) is not None:
        return False
    return call.idempotent or isinstance(outcome, _NOT_SENT)


def error_from_response(response: httpx.Response) -> SplitVaultClientError:
    """The error for a non-success response, with the server's message, Retry-After hint and
    headers."""
    retry_after = parse_retry_after(response.headers.get("Retry-After"))
    return error_for_status(
        response.status_code,
        _error_message(response),
        retry_after=retry_after,
        headers=response.headers,
    )


def request_error(exc: httpx.RequestError) -> SplitVaultClientError:
    """The error for a request that got no usable response: ``TLSError``, ``Timeout``,
    ``Unavailable`` or, for an answer that could not be decoded, ``ProtocolError``."""
    detail = str(exc) or type(exc).__name__
    tls = tls_failure(exc)
    error: SplitVaultClientError
    if tls is not None:
        error = TLSError(_tls_message(tls))
    elif isinstance(exc, httpx.TimeoutException):
        error = Timeout(_timeout_message(exc))
    elif isinstance(exc, httpx.TransportError):
        error = Unavailable(f"cannot reach the server: {detail}")
    else:
        error = ProtocolError(f"unreadable response: {detail}")
    error.__cause__ = exc
    return error


def tls_failure(exc: BaseException) -> ssl.SSLError | None:
    """The TLS configuration error behind ``exc``, if one is: a refused certificate, a TLS
    alert from the server, a server that does not speak TLS. Other TLS errors (a connection
    closed mid-handshake) stay transient."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, ssl.SSLCertVerificationError) or (
            type(current) is ssl.SSLError and _configuration_reason(current)
        ):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP date); ``None`` if absent/bad."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - datetime.now(UTC)).total_seconds()
    return max(0.0, seconds) if math.isfinite(seconds) else None


def _configuration_reason(error: ssl.SSLError) -> bool:
    reason = _reason(error)
    return "ALERT" in reason or any(name in reason for name in _NOT_TLS)


def _reason(error: ssl.SSLError) -> str:
    return str(getattr(error, "reason", None) or error.strerror or error)


def _tls_message(error: ssl.SSLError) -> str:
    if isinstance(error, ssl.SSLCertVerificationError):
        why = getattr(error, "verify_message", None) or error.strerror or str(error)
        return (
            f"TLS: the server's certificate was refused ({why}); pass ca= the "
            "CA certificate that issued it (a splitvault deployment's public/tls/ca.crt) and a "
            "URL whose host the certificate names (splitvault init --public-host HOST)"
        )
    reason = _reason(error)
    if any(alert in reason for alert in _CLIENT_REFUSED):
        return (
            f"TLS: the server refused this client ({reason}); pass cert=(certificate, key) "
            "issued by a CA the server trusts"
        )
    if "WRONG_VERSION_NUMBER" in reason:
        return f"TLS: the server does not speak TLS on this port ({reason}); is it http://?"
    return f"TLS handshake refused ({reason}); check ca=, cert= and the server's TLS settings"


def _timeout_message(exc: httpx.TimeoutException) -> str:
    phase, template = _TIMEOUTS.get(type(exc), ("read", "no answer from {host} within {s}"))
    host, seconds = "the server", None
    try:
        request = exc.request
    except RuntimeError:  # an error made without a request
        request = None
    if request is not None:
        host = request.url.host
        seconds = (request.extensions.get("timeout") or {}).get(phase)
    limit = "the time limit" if seconds is None else f"{seconds:g} s"
    return template.format(host=host, s=limit) + "; Client(timeout=...) sets the limit"


def _error_message(response: httpx.Response) -> str:
    try:
        doc = response.json()
    except ValueError:
        doc = None
    if isinstance(doc, dict):
        for key in ("error", "detail"):
            if isinstance(doc.get(key), str):
                return str(doc[key])
        error = doc.get("error")  # OpenAI's shape (/v1/embeddings): {"error": {"message": ...}}
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])
    text = response.text.strip()[:_MAX_ERROR_TEXT]
    return text or response.reason_phrase or "no message"
