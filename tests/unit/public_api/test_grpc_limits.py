"""The v2 gRPC ingress's own limits (``public_api.grpc_limits``) and the OpenAI error shape."""

from __future__ import annotations

import grpc
import pytest
from prometheus_client import CollectorRegistry, Gauge

from protos import open_inference_pb2 as oip
from public_api.errors import error_body, error_code
from public_api.grpc_limits import InFlight, MessageGate, Refused
from shared.errors import (
    InvalidInput,
    MessageTooLarge,
    Overloaded,
    QuotaExceeded,
    TermsNotAccepted,
    mapping_for,
)


def _gate(max_bytes: int) -> MessageGate[oip.ModelInferRequest]:
    return MessageGate(oip.ModelInferRequest.FromString, max_bytes)


def test_a_message_within_the_limit_is_parsed() -> None:
    data = oip.ModelInferRequest(model_name="digits").SerializeToString()
    parsed = _gate(len(data))(data)
    assert isinstance(parsed, oip.ModelInferRequest) and parsed.model_name == "digits"


def test_a_message_over_the_limit_is_refused_unparsed_as_resource_exhausted() -> None:
    data = oip.ModelInferRequest(model_name="digits").SerializeToString()
    refused = _gate(len(data) - 1)(data)
    assert isinstance(refused, Refused) and isinstance(refused.error, MessageTooLarge)
    assert f"{len(data)} bytes exceeds the limit of {len(data) - 1}" in refused.error.message
    mapping = mapping_for(refused.error)
    assert (mapping.grpc_code, mapping.http_status) == (grpc.StatusCode.RESOURCE_EXHAUSTED, 413)


def test_a_malformed_message_is_refused_as_invalid_input() -> None:
    refused = _gate(1024)(b"\xff\xff\xff")
    assert isinstance(refused, Refused) and type(refused.error) is InvalidInput


def test_calls_beyond_the_limit_are_overloaded_and_the_gauge_follows() -> None:
    gauge = Gauge("in_flight", "test", registry=CollectorRegistry())
    in_flight = InFlight(2, gauge)
    in_flight.enter()
    in_flight.enter()
    with pytest.raises(Overloaded, match="too many calls in flight") as refused:
        in_flight.enter()
    assert refused.value.retry_after_s == 1.0
    assert mapping_for(refused.value).grpc_code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert gauge._value.get() == 2
    in_flight.leave()
    in_flight.enter()  # a slot freed is a slot taken
    assert gauge._value.get() == 2


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, "invalid_request_error"),
        (401, "authentication_error"),
        (403, "permission_error"),
        (404, "not_found_error"),
        (413, "invalid_request_error"),
        (429, "rate_limit_error"),
        (503, "server_error"),
    ],
)
def test_openai_paths_get_openai_error_objects(status: int, kind: str) -> None:
    body = error_body({"path": "/v1/embeddings"}, status, "no", "some_code", "input")
    assert body == {"error": {"message": "no", "type": kind, "param": "input", "code": "some_code"}}


def test_other_paths_keep_the_tiers_error_shape() -> None:
    assert error_body({"path": "/v2/models/digits/infer"}, 429, "no", "x") == {"error": "no"}
    assert error_body(None, 400, "no") == {"error": "no"}


def test_error_codes_are_class_names_in_snake_case() -> None:
    assert error_code(TermsNotAccepted("x")) == "terms_not_accepted"
    assert error_code(QuotaExceeded) == "quota_exceeded"
