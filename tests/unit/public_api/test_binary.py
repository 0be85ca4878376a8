"""The binary tensor data extension: splitting requests, encoding answers (read back by the
stock client's own decoder)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tritonclient.http import InferResult

from public_api.binary import binary_answer, input_buffers, split_body, wants_binary
from public_api.v2 import InferenceRequest, InferenceResponse, ResponseOutput
from shared.errors import InvalidInput


def _request(**fields: object) -> InferenceRequest:
    tensor = {"name": "x", "shape": [2], "datatype": "FP32"}
    return InferenceRequest.model_validate({"inputs": [tensor], **fields})


def test_split_body_takes_the_declared_header() -> None:
    head, tail = split_body(b'{"a":1}rest', "7")
    assert (head, bytes(tail)) == (b'{"a":1}', b"rest")


@pytest.mark.parametrize("declared", ["12", "-1", "x", ""])
def test_split_body_refuses_a_header_length_that_is_no_prefix(declared: str) -> None:
    with pytest.raises(InvalidInput, match="Inference-Header-Content-Length"):
        split_body(b'{"a":1}rest', declared)


def test_input_buffers_take_their_sizes_in_order() -> None:
    inputs = [
        {"name": n, "shape": [1], "datatype": "FP32", "parameters": {"binary_data_size": 4}}
        for n in ("a", "b")
    ]
    request = InferenceRequest.model_validate({"inputs": inputs})
    buffers = input_buffers(request, memoryview(b"AAAABBBB"))
    assert {name: bytes(data) for name, data in buffers.items()} == {"a": b"AAAA", "b": b"BBBB"}


@pytest.mark.parametrize(
    ("parameters", "tail", "says"),
    [
        ({"binary_data_size": 8}, b"1234", "runs past"),
        ({"binary_data_size": 4}, b"12345678", "add up to 4"),
        ({"binary_data_size": True}, b"", "byte count"),
        ({"binary_data_size": -4}, b"", "byte count"),
    ],
)
def test_input_buffers_refuse_sizes_that_do_not_fit(
    parameters: dict[str, object], tail: bytes, says: str
) -> None:
    tensor = {"name": "x", "shape": [1], "datatype": "FP32", "parameters": parameters}
    with pytest.raises(InvalidInput, match=says):
        input_buffers(InferenceRequest.model_validate({"inputs": [tensor]}), memoryview(tail))


def test_an_output_s_own_binary_data_overrides_the_request_s() -> None:
    assert wants_binary(_request(parameters={"binary_data_output": True}))
    assert not wants_binary(_request())
    no = [{"name": "classification", "parameters": {"binary_data": False}}]
    assert not wants_binary(_request(parameters={"binary_data_output": True}, outputs=no))


@pytest.mark.parametrize(
    ("datatype", "data", "expected"),
    [
        ("BYTES", ["0.9:7:seven", "0.1:1:one"], np.array([b"0.9:7:seven", b"0.1:1:one"])),
        ("FP32", [0.5, -1.25], np.array([0.5, -1.25], np.float32)),
    ],
)
def test_binary_answers_read_back_with_the_stock_decoder(
    datatype: str, data: list[object], expected: np.ndarray
) -> None:
    output = ResponseOutput(name="out", shape=[1, 2], datatype=datatype, data=data)
    answer = binary_answer(InferenceResponse(model_name="m", id="r", outputs=[output]))
    header = json.loads(answer.body[: answer.header_length])
    assert "data" not in header["outputs"][0] and header["id"] == "r"
    result = InferResult.from_response_body(answer.body, header_length=answer.header_length)
    np.testing.assert_array_equal(result.as_numpy("out"), expected.reshape(1, 2))
