"""Sealed request bodies read back as the public tier read them: a model's input arrays.

Each sealed row names how its body is encoded (``public_api.sealing``): REST v2 JSON, REST v2
with binary tensors after a JSON header, or a v2 gRPC ``ModelInferRequest``. All three go
through the public tier's own parsers (``public_api.binary``, ``public_api.grpc_messages``,
``shared.tensor_codec``), so a body decodes here exactly as it decoded when it was served.
Bodies of other kinds (the embeddings API, text sent as ``BYTES``) are reported, not read.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import numpy as np
from google.protobuf.message import DecodeError
from pydantic import ValidationError

from protos import open_inference_pb2 as oip
from public_api.binary import input_buffers, split_body
from public_api.grpc_messages import infer_request
from public_api.sealing import GRPC_MODEL_INFER, V2_JSON, binary_header_length
from public_api.v2 import InferenceRequest
from shared.errors import SplitVaultError
from shared.manifest import TensorSpec
from shared.tensor_codec import array_from_bytes, array_from_json

MAX_ELEMENTS = 1 << 31
Buffers = Mapping[str, bytes | memoryview]


def decode_body(
    body: bytes, content_type: str, specs: Sequence[TensorSpec]
) -> dict[str, np.ndarray]:
    """The inputs ``specs`` of a sealed body; ``ValueError`` saying why it cannot be read."""
    try:
        request, raw = _request(body, content_type)
    except SplitVaultError as error:
        raise ValueError(f"not a readable request body: {error.message}") from None
    items = {item.name: item for item in request.inputs}
    arrays = {}
    for spec in specs:
        item = items.get(spec.name)
        if item is None:
            raise ValueError(f"the body lacks the input {spec.name!r}")
        try:
            if item.name in raw:
                array = array_from_bytes(
                    raw[item.name], item.datatype, item.shape, max_elements=MAX_ELEMENTS
                )
            elif item.data is not None:
                array = array_from_json(
                    item.data, item.datatype, item.shape, max_elements=MAX_ELEMENTS
                )
            else:
                raise ValueError("no data")
        except (SplitVaultError, ValueError, TypeError) as error:
            raise ValueError(f"input {spec.name!r} does not decode: {error}") from None
        arrays[spec.name] = array
    return arrays


def _request(body: bytes, content_type: str) -> tuple[InferenceRequest, Buffers]:
    """The v2 request of a body and its raw tensors by input name."""
    if content_type in ("", V2_JSON):  # "": sealed before content types, always v2 JSON
        return _json(body), {}
    if content_type == GRPC_MODEL_INFER:
        try:
            message = oip.ModelInferRequest.FromString(body)
        except DecodeError:
            raise ValueError("not a ModelInferRequest") from None
        return infer_request(message)
    length = binary_header_length(content_type)
    if length is None:
        raise ValueError(f"bodies of type {content_type!r} are not read as candidates")
    head, tail = split_body(body, str(length))
    request = _json(head)
    return request, input_buffers(request, tail)


def _json(body: bytes) -> InferenceRequest:
    try:
        return InferenceRequest.model_validate(json.loads(body))
    except (ValueError, ValidationError) as error:
        raise ValueError(f"not a v2 request body: {error}") from None
