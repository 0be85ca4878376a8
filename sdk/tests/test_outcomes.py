"""Outcomes of a try: error mapping (TLS, timeouts, statuses) and retry decisions, no network."""

from __future__ import annotations

import json
import ssl
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import httpx
import numpy as np
import pytest

from splitvault_client import (
    BadRequest,
    Forbidden,
    ModelNotFound,
    ProtocolError,
    RateLimited,
    ServerError,
    SplitVaultClientError,
    Timeout,
    TLSError,
    Unauthorized,
    Unavailable,
)
from splitvault_client import _outcomes as outcomes
from splitvault_client import _protocol as proto

REQUEST = httpx.Request("GET", "http://server/")


def response(
    status: int, body: Any = None, headers: dict[str, str] | None = None
) -> httpx.Response:
    """An httpx response as the server would send it."""
    content = b"" if body is None else json.dumps(body).encode()
    return httpx.Response(status, content=content, headers=headers, request=REQUEST)


# --- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (400, BadRequest),
        (413, BadRequest),
        (401, Unauthorized),
        (403, Forbidden),
        (404, ModelNotFound),
        (429, RateLimited),
        (503, Unavailable),
        (500, ServerError),
        (502, ServerError),
        (418, SplitVaultClientError),
    ],
)
def test_error_statuses_map_to_classes(status: int, cls: type[SplitVaultClientError]) -> None:
    error = outcomes.error_from_response(
        response(status, {"error": "nope"}, headers={"Retry-After": "7"})
    )
    assert type(error) is cls
    assert error.status == status and error.message == "nope" and error.retry_after == 7.0
    assert str(error) == f"{status}: nope"


def test_error_message_falls_back_to_body_text_or_reason() -> None:
    text = httpx.Response(500, content=b"upstream exploded", request=REQUEST)
    assert outcomes.error_from_response(text).message == "upstream exploded"
    assert outcomes.error_from_response(response(502)).message == "Bad Gateway"
    assert (
        outcomes.error_from_response(response(422, {"detail": "bad field"})).message == "bad field"
    )


def test_retry_after_parsing() -> None:
    assert outcomes.parse_retry_after(None) is None
    assert outcomes.parse_retry_after("2") == 2.0
    assert outcomes.parse_retry_after("0.5") == 0.5
    assert outcomes.parse_retry_after("-3") == 0.0
    assert outcomes.parse_retry_after("soon") is None
    assert outcomes.parse_retry_after("nan") is None
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    seconds = outcomes.parse_retry_after(later)
    assert seconds is not None and 25 < seconds <= 30
    assert outcomes.parse_retry_after("Mon, 01 Jan 2001 00:00:00 GMT") == 0.0


def test_connection_errors_map_to_unavailable_with_their_cause() -> None:
    cause = httpx.ConnectError("refused")
    error = outcomes.request_error(cause)
    assert type(error) is Unavailable and error.status is None and error.__cause__ is cause
    assert "refused" in error.message
    decoding = outcomes.request_error(httpx.DecodingError("bad gzip"))
    assert type(decoding) is ProtocolError


# --- retry decisions -----------------------------------------------------------------------

GET = proto.metadata_call("m")
POST = proto.infer_call("m", {"x": np.zeros(1)})


def test_backoff_grows_exponentially_and_is_capped() -> None:
    policy = outcomes.RetryPolicy(retries=5, backoff=0.5, max_backoff=3.0)
    failure = response(503)
    assert [policy.delay(GET, n, failure) for n in range(6)] == [0.5, 1.0, 2.0, 3.0, 3.0, None]


def test_retry_after_wins_over_backoff_up_to_the_cap() -> None:
    policy = outcomes.RetryPolicy(retries=3, backoff=0.1, max_backoff=10.0)
    assert policy.delay(POST, 0, response(503, headers={"Retry-After": "4"})) == 4.0
    assert policy.delay(POST, 0, response(503, headers={"Retry-After": "99"})) == 10.0


def test_no_retries_by_default() -> None:
    assert outcomes.RetryPolicy().delay(GET, 0, response(503)) is None


@pytest.mark.parametrize(
    ("call", "outcome", "expected"),
    [
        (GET, response(503), True),
        (GET, response(429), True),
        (GET, response(502), True),
        (GET, response(500), False),
        (GET, response(404), False),
        (GET, httpx.ReadTimeout("slow"), True),
        (GET, httpx.ConnectError("refused"), True),
        (POST, response(503), True),
        (POST, response(429), False),
        (POST, response(502), False),
        (POST, response(500), False),
        (POST, httpx.ConnectError("refused"), True),
        (POST, httpx.ConnectTimeout("slow"), True),
        (POST, httpx.ReadTimeout("slow"), False),
        (POST, httpx.RemoteProtocolError("closed"), False),
        (GET, httpx.DecodingError("bad gzip"), False),
    ],
)
def test_what_is_retried(call: proto.Call, outcome: outcomes.Outcome, expected: bool) -> None:
    assert outcomes.retryable(call, outcome) is expected


def test_certificate_failures_are_not_retried() -> None:
    error = httpx.ConnectError("verify failed")
    error.__cause__ = ssl.SSLCertVerificationError("certificate verify failed")
    assert not outcomes.retryable(GET, error)
    assert "certificate" in outcomes.request_error(error).message


def _caused_by(error: httpx.TransportError, cause: BaseException) -> httpx.TransportError:
    error.__cause__ = cause
    return error


@pytest.mark.parametrize(
    ("cause", "fix"),
    [
        (ssl.SSLCertVerificationError(1, "certificate verify failed"), "pass ca="),
        (ssl.SSLError(1, "[SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED] alert"), "pass cert="),
        (ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number"), "http://"),
        (ssl.SSLError(1, "[SSL: SSLV3_ALERT_HANDSHAKE_FAILURE] alert"), "TLS settings"),
    ],
)
def test_tls_failures_are_configuration_errors_never_retried(cause: ssl.SSLError, fix: str) -> None:
    for error in (httpx.ConnectError("tls"), httpx.ReadError("tls")):
        failure = _caused_by(error, cause)
        mapped = outcomes.request_error(failure)
        assert type(mapped) is TLSError and not isinstance(mapped, Unavailable)
        assert fix in mapped.message and mapped.__cause__ is failure
        assert not outcomes.retryable(GET, failure)


@pytest.mark.parametrize(
    "cause",
    [
        ssl.SSLEOFError(8, "[SSL: UNEXPECTED_EOF_WHILE_READING] EOF occurred"),
        ssl.SSLError(1, "[SSL: DECRYPTION_FAILED_OR_BAD_RECORD_MAC] bad record mac"),
    ],
)
def test_other_tls_errors_are_transient(cause: ssl.SSLError) -> None:
    failure = _caused_by(httpx.ConnectError("tls"), cause)
    assert type(outcomes.request_error(failure)) is Unavailable
    assert outcomes.retryable(GET, failure)


@pytest.mark.parametrize(
    ("error", "says"),
    [
        (httpx.ConnectTimeout, "no connection to models.example within 2.5 s"),
        (httpx.ReadTimeout, "models.example sent no answer within 7 s (it may still be working)"),
        (httpx.WriteTimeout, "could not send the request to models.example within 2.5 s"),
        (httpx.PoolTimeout, "no free connection to models.example within 1 s"),
    ],
)
def test_timeouts_say_which_limit_ran_out(error: type[httpx.TimeoutException], says: str) -> None:
    timeouts = {"connect": 2.5, "read": 7.0, "write": 2.5, "pool": 1.0}
    request = httpx.Request("POST", "https://models.example/v2", extensions={"timeout": timeouts})
    mapped = outcomes.request_error(error("timed out", request=request))
    assert type(mapped) is Timeout and isinstance(mapped, Unavailable)
    assert mapped.message == f"{says}; Client(timeout=...) sets the limit"
    assert "cannot reach" not in mapped.message


def test_a_timeout_without_its_request_still_reads_well() -> None:
    mapped = outcomes.request_error(httpx.ReadTimeout("slow"))
    assert type(mapped) is Timeout
    assert mapped.message.startswith("the server sent no answer within the time limit")


def test_error_responses_keep_their_headers() -> None:
    policy = '"burst";q=5;w=10'
    error = outcomes.error_from_response(
        response(429, {"error": "slow down"}, {"RateLimit-Policy": policy})
    )
    assert type(error) is RateLimited and error.headers["ratelimit-policy"] == policy
