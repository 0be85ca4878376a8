"""Request building and response parsing, with no network."""

from __future__ import annotations

import json
import math
from typing import Any

import httpx
import numpy as np
import pytest

from splitvault_client import (
    ProtocolError,
    TensorSpec,
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
