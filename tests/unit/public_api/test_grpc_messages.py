"""v2 gRPC messages to the v2 REST request the service decodes, and the peer's address."""

from __future__ import annotations

import pytest

from protos import open_inference_pb2 as oip
from public_api.grpc_messages import infer_request, peer_address
from shared.errors import InvalidInput

Tensor = oip.ModelInferRequest.InferInputTensor


@pytest.mark.parametrize(
    ("peer", "address"),
    [
        ("ipv4:127.0.0.1:5555", "127.0.0.1"),
        ("ipv6:[::1]:5555", "::1"),
        ("ipv6:%5B2001:db8::1%5D:5555", "2001:db8::1"),
        ("unix:/tmp/socket", "unknown"),
        ("", "unknown"),
    ],
)
def test_peer_address(peer: str, address: str) -> None:
    assert peer_address(peer) == address


def test_typed_contents_become_json_data_and_parameters_become_values() -> None:
    message = oip.ModelInferRequest(
        model_name="m",
        id="r-1",
        inputs=[
            Tensor(
                name="x",
                datatype="FP32",
                shape=[2],
                contents=oip.InferTensorContents(fp32_contents=[0.5, 1.5]),
            )
        ],
        outputs=[
            oip.ModelInferRequest.InferRequestedOutputTensor(
                name="classification",
                parameters={"classification": oip.InferParameter(int64_param=3)},
            )
        ],
    )
    request, raw = infer_request(message)
    assert raw == {} and request.id == "r-1"
    assert request.inputs[0].data == [0.5, 1.5]
    assert request.outputs is not None
    assert request.outputs[0].parameters == {"classification": 3}


def test_raw_contents_go_by_input_name() -> None:
    message = oip.ModelInferRequest(
        inputs=[Tensor(name="a", datatype="FP32", shape=[1])], raw_input_contents=[b"\0\0\0\0"]
    )
    request, raw = infer_request(message)
    assert raw == {"a": b"\0\0\0\0"} and request.inputs[0].data is None


@pytest.mark.parametrize(
    ("message", "says"),
    [
        (
            oip.ModelInferRequest(
                inputs=[Tensor(name="a", datatype="FP32", shape=[1])], raw_input_contents=[b"", b""]
            ),
            "2 entries for 1 inputs",
        ),
        (oip.ModelInferRequest(), "inputs"),
        (
            oip.ModelInferRequest(inputs=[Tensor(name="a", datatype="FP32", shape=[1] * 17)]),
            "inputs.0.shape",
        ),
    ],
    ids=["raw-count", "no-inputs", "rank"],
)
def test_malformed_requests_are_invalid_input(message: oip.ModelInferRequest, says: str) -> None:
    with pytest.raises(InvalidInput, match=says):
        infer_request(message)
