"""Request building, response parsing, error mapping and retry decisions, with no network."""

from __future__ import annotations

import json
import math
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
    TensorSpec,
    Unauthorized,
    Unavailable,
)
from splitvault_client import _protocol as proto

REQUEST = httpx.Request("GET", "http://server/")


def response(
    status: int, body: Any = None, headers: dict[str, str] | None = None
) -> httpx.Response:
    """An httpx response as the server would send it."""
    content = b"" if body is None else json.dumps(body).encode()
    return httpx.Response(status, content=content, headers=headers, request=REQUEST)


def infer_response(outputs: list[dict[str, Any]]) -> httpx.Response:
    return response(200, {"model_name": "m", "id": "req-1", "outputs": outputs})


# --- request building ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "datatype"),
    [
        (np.float32, "FP32"),
        (np.float16, "FP16"),
        (np.float64, "FP64"),
        (np.int64, "INT64"),
        (np.int32, "INT32"),
        (np.int16, "INT16"),
        (np.int8, "INT8"),
        (np.uint8, "UINT8"),
        (np.uint64, "UINT64"),
        (np.bool_, "BOOL"),
        (">f4", "FP32"),
    ],
)
def test_datatype_follows_dtype(dtype: Any, datatype: str) -> None:
    tensor = proto.tensor_json("x", np.ones((2, 2), dtype=dtype))
    assert tensor["datatype"] == datatype
    assert tensor["shape"] == [2, 2]


@pytest.mark.parametrize("dtype", [np.complex64, np.str_, np.object_, "datetime64[s]"])
def test_unsupported_dtypes_are_refused(dtype: Any) -> None:
    with pytest.raises(ValueError, match="no v2 datatype"):
        proto.tensor_json("x", np.zeros(2, dtype=dtype))


def test_data_is_flat_and_row_major_even_for_transposed_arrays() -> None:
    array = np.arange(6, dtype=np.int64).reshape(2, 3).T  # Fortran-ordered view, shape (3, 2)
    tensor = proto.tensor_json("x", array)
    assert tensor["shape"] == [3, 2]
    assert tensor["data"] == [0, 3, 1, 4, 2, 5]


def test_non_finite_floats_and_non_arrays_are_refused() -> None:
    with pytest.raises(ValueError, match="NaN or infinity"):
        proto.tensor_json("x", np.array([1.0, np.inf], dtype=np.float32))
    with pytest.raises(TypeError, match="NumPy array"):
        proto.tensor_json("x", [1.0, 2.0])  # type: ignore[arg-type]


def test_infer_call_body_and_path() -> None:
    inputs = {"a": np.array([[1.5, 2.5]], dtype=np.float32), "b": np.array([True, False])}
    call = proto.infer_call("my/model", inputs, top_k=3, request_id="r1")
    assert (call.method, call.path) == ("POST", "/v2/models/my%2Fmodel/infer")
    assert call.headers == {"Content-Type": "application/json"}
    assert call.body is not None
    assert json.loads(call.body) == {
        "id": "r1",
        "inputs": [
            {"name": "a", "shape": [1, 2], "datatype": "FP32", "data": [1.5, 2.5]},
            {"name": "b", "shape": [2], "datatype": "BOOL", "data": [True, False]},
        ],
        "parameters": {"classification": 3},
    }


def test_infer_call_without_options_sends_only_inputs() -> None:
    call = proto.infer_call("m", {"x": np.zeros(1, dtype=np.int32)})
    assert call.body is not None
    assert set(json.loads(call.body)) == {"inputs"}


@pytest.mark.parametrize("top_k", [0, -1, True, 2.0])
def test_bad_top_k_is_refused(top_k: Any) -> None:
    with pytest.raises(ValueError, match="top_k"):
        proto.infer_call("m", {"x": np.zeros(1)}, top_k=top_k)


def test_empty_inputs_and_model_names_are_refused() -> None:
    with pytest.raises(TypeError):
        proto.infer_call("m", {})
    with pytest.raises(ValueError, match="model"):
        proto.metadata_call("")


def test_get_calls_are_idempotent_and_bodiless() -> None:
    for call in (proto.live_call(), proto.ready_call(), proto.model_ready_call("m")):
        assert call.idempotent and call.body is None and 503 in call.accept
    assert proto.metadata_call("m").path == "/v2/models/m"
    assert proto.model_ready_call("m").path == "/v2/models/m/ready"
    accept = proto.accept_terms_call("v2")
    assert not accept.idempotent
    assert accept.body is not None and json.loads(accept.body) == {"version": "v2"}


def test_settings_carry_bearer_and_refuse_bad_arguments() -> None:
    retry = proto.RetryPolicy()
    settings = proto.make_settings(
        "https://h", api_key="k1", ca=None, cert=None, timeout=5, retry=retry
    )
    assert settings.headers["Authorization"] == "Bearer k1"
    assert settings.verify.verify_mode.name == "CERT_REQUIRED"
    plain = proto.make_settings(
        "http://h", api_key=None, ca=None, cert=None, timeout=5, retry=retry
    )
    assert "Authorization" not in plain.headers
    for kwargs in ({"url": "ftp://h"}, {"timeout": 0}, {"api_key": " "}):
        args: dict[str, Any] = {"url": "http://h", "api_key": None, "timeout": 1.0} | kwargs
        with pytest.raises(ValueError):
            proto.make_settings(args.pop("url"), ca=None, cert=None, retry=retry, **args)
    with pytest.raises(ValueError):
        bad_retry = proto.RetryPolicy(retries=-1)
        proto.make_settings(
            "http://h", api_key=None, ca=None, cert=None, timeout=1, retry=bad_retry
        )


# --- response parsing ----------------------------------------------------------------------


def test_classification_strings_become_labels_indices_and_scores() -> None:
    data = ["0.75:3:three", "0.25:1:one:and:colons", "0.5:7", ":2:two"]
    out = {"name": "classification", "datatype": "BYTES", "shape": [2, 2], "data": data}
    prediction = proto.parse_prediction(infer_response([out]))
    assert prediction.task == "classification" and prediction.id == "req-1"
    assert prediction.labels == [["three", "one:and:colons"], [None, "two"]]
    assert prediction.indices is not None and prediction.scores is not None
    assert prediction.indices.dtype == np.int64
    assert prediction.indices.tolist() == [[3, 1], [7, 2]]
    assert prediction.scores.dtype == np.float32 and prediction.scores.shape == (2, 2)
    assert prediction.scores[0].tolist() == [0.75, 0.25]
    assert prediction.scores[1, 0] == 0.5 and math.isnan(prediction.scores[1, 1])
    assert prediction.embeddings is None
    assert prediction.raw["model_name"] == "m"


def test_embedding_output_becomes_float32_matrix() -> None:
    out = {"name": "embedding", "datatype": "FP32", "shape": [2, 3], "data": [1, 2, 3, 4, 5, 6.5]}
    prediction = proto.parse_prediction(infer_response([out]))
    assert prediction.task == "embedding" and prediction.labels is None
    assert prediction.embeddings is not None
    assert prediction.embeddings.dtype == np.float32
    assert prediction.embeddings.tolist() == [[1, 2, 3], [4, 5, 6.5]]


@pytest.mark.parametrize(
    "outputs",
    [
        [{"name": "classification", "shape": [1, 2], "data": ["0.1:1"]}],  # too few entries
        [{"name": "classification", "shape": [1, 1], "data": ["0.1"]}],  # no index
        [{"name": "classification", "shape": [1, 1], "data": ["x:1:a"]}],  # score not a number
        [{"name": "classification", "shape": [1, 1], "data": [7]}],  # not a string
        [{"name": "embedding", "shape": [1, 2], "data": ["a", "b"]}],
        [{"name": "embedding", "shape": [2], "data": [1, 2]}],
        [{"name": "embedding", "shape": [1, 2], "data": [[1], [2, 3]]}],
        [{"name": "logits", "shape": [1, 1], "data": [1]}],
    ],
)
def test_malformed_outputs_raise_protocol_error(outputs: list[dict[str, Any]]) -> None:
    with pytest.raises(ProtocolError):
        proto.parse_prediction(infer_response(outputs))


def test_non_json_answer_raises_protocol_error() -> None:
    bad = httpx.Response(200, content=b"<html>", request=REQUEST)
    with pytest.raises(ProtocolError, match="not JSON"):
        proto.parse_metadata(bad)
    with pytest.raises(ProtocolError, match="object"):
        proto.parse_terms(response(200, ["a"]))


METADATA = {
    "name": "resnet",
    "versions": ["1"],
    "platform": "splitvault",
    "inputs": [{"name": "image", "datatype": "FP32", "shape": [-1, 3, 224, 224]}],
    "outputs": [{"name": "classification", "datatype": "BYTES", "shape": [-1, 5]}],
    "parameters": {"task": "classification", "policy": {"kind": "top_k", "k": 5}, "labels": ["a"]},
}


def test_metadata_is_parsed() -> None:
    meta = proto.parse_metadata(response(200, METADATA))
    assert meta.name == "resnet" and meta.versions == ("1",) and meta.platform == "splitvault"
    assert meta.inputs == (TensorSpec("image", "FP32", (-1, 3, 224, 224)),)
    assert meta.outputs[0].name == "classification"
    assert meta.task == "classification"
    assert meta.policy == {"kind": "top_k", "k": 5}
    assert meta.labels == ("a",)
    assert proto.single_input_name(meta) == "image"


def test_metadata_with_unknown_task_or_bad_shape_is_refused() -> None:
    for change in (
        {"parameters": {"task": "segmentation"}},
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": ["a"]}]},
        {"name": None},
    ):
        with pytest.raises(ProtocolError):
            proto.parse_metadata(response(200, METADATA | change))


def test_multi_input_model_needs_named_inputs() -> None:
    mask = {"name": "m", "datatype": "INT64", "shape": [-1]}
    two = METADATA | {"inputs": [*METADATA["inputs"], mask]}
    with pytest.raises(ValueError, match="image, m"):
        proto.single_input_name(proto.parse_metadata(response(200, two)))


def test_terms_and_acceptance_are_parsed() -> None:
    terms = proto.parse_terms(response(200, {"version": "v1", "text": "Be nice", "sha256": "ab"}))
    assert (terms.version, terms.text, terms.sha256) == ("v1", "Be nice", "ab")
    accepted = proto.parse_acceptance(response(200, {"accepted": True, "version": "v1"}))
    assert accepted.accepted and accepted.version == "v1"


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
    error = proto.error_from_response(
        response(status, {"error": "nope"}, headers={"Retry-After": "7"})
    )
    assert type(error) is cls
    assert error.status == status and error.message == "nope" and error.retry_after == 7.0
    assert str(error) == f"{status}: nope"


def test_error_message_falls_back_to_body_text_or_reason() -> None:
    text = httpx.Response(500, content=b"upstream exploded", request=REQUEST)
    assert proto.error_from_response(text).message == "upstream exploded"
    assert proto.error_from_response(response(502)).message == "Bad Gateway"
    assert proto.error_from_response(response(422, {"detail": "bad field"})).message == "bad field"


def test_retry_after_parsing() -> None:
    assert proto.parse_retry_after(None) is None
    assert proto.parse_retry_after("2") == 2.0
    assert proto.parse_retry_after("0.5") == 0.5
    assert proto.parse_retry_after("-3") == 0.0
    assert proto.parse_retry_after("soon") is None
    assert proto.parse_retry_after("nan") is None
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    seconds = proto.parse_retry_after(later)
    assert seconds is not None and 25 < seconds <= 30
    assert proto.parse_retry_after("Mon, 01 Jan 2001 00:00:00 GMT") == 0.0


def test_connection_errors_map_to_unavailable_with_their_cause() -> None:
    cause = httpx.ConnectError("refused")
    error = proto.request_error(cause)
    assert type(error) is Unavailable and error.status is None and error.__cause__ is cause
    assert "refused" in error.message
    decoding = proto.request_error(httpx.DecodingError("bad gzip"))
    assert type(decoding) is ProtocolError


# --- retry decisions -----------------------------------------------------------------------

GET = proto.metadata_call("m")
POST = proto.infer_call("m", {"x": np.zeros(1)})


def test_backoff_grows_exponentially_and_is_capped() -> None:
    policy = proto.RetryPolicy(retries=5, backoff=0.5, max_backoff=3.0)
    failure = response(503)
    assert [policy.delay(GET, n, failure) for n in range(6)] == [0.5, 1.0, 2.0, 3.0, 3.0, None]


def test_retry_after_wins_over_backoff_up_to_the_cap() -> None:
    policy = proto.RetryPolicy(retries=3, backoff=0.1, max_backoff=10.0)
    assert policy.delay(POST, 0, response(503, headers={"Retry-After": "4"})) == 4.0
    assert policy.delay(POST, 0, response(503, headers={"Retry-After": "99"})) == 10.0


def test_no_retries_by_default() -> None:
    assert proto.RetryPolicy().delay(GET, 0, response(503)) is None


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
def test_what_is_retried(call: proto.Call, outcome: proto.Outcome, expected: bool) -> None:
    assert proto.retryable(call, outcome) is expected


def test_certificate_failures_are_not_retried() -> None:
    error = httpx.ConnectError("verify failed")
    error.__cause__ = ssl.SSLCertVerificationError("certificate verify failed")
    assert not proto.retryable(GET, error)
    assert "certificate" in proto.request_error(error).message
