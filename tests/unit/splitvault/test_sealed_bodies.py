"""Sealed bodies read back as the public tier read them (v2 JSON, v2 binary, gRPC), and the
signed digest compared with a sealed body's."""

from __future__ import annotations

import base64
import hashlib
import json

import numpy as np
import pytest

from protos import open_inference_pb2 as oip
from public_api.sealing import (
    EMBEDDINGS_JSON,
    GRPC_MODEL_INFER,
    V2_JSON,
    content_digest,
    v2_binary_type,
)
from shared.manifest import TensorSpec
from splitvault.ownership.bodies import decode_body
from splitvault.ownership.content import signed_sha256

SPECS = [TensorSpec(name="image", datatype="FP32", shape=[-1, 1, 8, 8])]
IMAGES = np.random.default_rng(0).random((3, 1, 8, 8), dtype=np.float32)


def _json_body() -> bytes:
    tensor = {"name": "image", "shape": [3, 1, 8, 8], "datatype": "FP32"}
    return json.dumps({"inputs": [{**tensor, "data": IMAGES.ravel().tolist()}]}).encode()


def _binary_body() -> tuple[bytes, int]:
    tensor = {"name": "image", "shape": [3, 1, 8, 8], "datatype": "FP32"}
    head = json.dumps(
        {"inputs": [{**tensor, "parameters": {"binary_data_size": IMAGES.nbytes}}]}
    ).encode()
    return head + IMAGES.tobytes(), len(head)


def _grpc_body() -> bytes:
    tensor = oip.ModelInferRequest.InferInputTensor(
        name="image", datatype="FP32", shape=[3, 1, 8, 8]
    )
    message = oip.ModelInferRequest(
        model_name="digits", id="g-1", inputs=[tensor], raw_input_contents=[IMAGES.tobytes()]
    )
    return message.SerializeToString()


def test_every_sealed_encoding_decodes_to_the_same_inputs() -> None:
    binary, header = _binary_body()
    for body, content_type in (
        (_json_body(), V2_JSON),
        (_json_body(), ""),  # sealed before content types: v2 JSON
        (binary, v2_binary_type(header)),
        (_grpc_body(), GRPC_MODEL_INFER),
    ):
        arrays = decode_body(body, content_type, SPECS)
        np.testing.assert_array_equal(arrays["image"], IMAGES)


@pytest.mark.parametrize(
    ("body", "content_type", "problem"),
    [
        (b'{"model": "m", "input": ["hi"]}', EMBEDDINGS_JSON, "not read as candidates"),
        (b"\xff\xff", GRPC_MODEL_INFER, "not a ModelInferRequest"),
        (_binary_body()[0], v2_binary_type(7), "not a v2 request body"),
        (_binary_body()[0][:-4], v2_binary_type(_binary_body()[1]), "runs past"),
        (_json_body().replace(b'"image"', b'"other"'), V2_JSON, "lacks the input 'image'"),
    ],
)
def test_a_body_that_cannot_be_read_says_why(body: bytes, content_type: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        decode_body(body, content_type, SPECS)


def test_the_signed_digest_is_compared_as_sha_256_bytes() -> None:
    body = _json_body()
    digest = hashlib.sha256(body).hexdigest()
    assert signed_sha256(content_digest(digest)) == bytes.fromhex(digest)
    sha512 = base64.b64encode(hashlib.sha512(body).digest()).decode()
    assert signed_sha256(f"sha-512=:{sha512}:") is None
    assert signed_sha256("not a digest") is None
