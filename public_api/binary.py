"""The v2 binary tensor data extension: tensors as raw bytes after a JSON header.

A request whose ``Inference-Header-Content-Length`` header is N carries the v2 JSON in its first
N bytes; each input with ``parameters.binary_data_size`` (and no ``data``) takes that many of
the bytes that follow, in the order of ``inputs``. An answer is sent the same way when the
request asks for it (``binary_data`` on an output, or ``binary_data_output`` on the request):
its outputs' data follows the JSON, which names each output's ``binary_data_size``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from public_api.v2 import InferenceRequest, InferenceResponse, ResponseOutput
from shared.errors import InvalidInput
from shared.tensor_codec import bytes_tensor, numpy_dtype, raw_bytes

HEADER_LENGTH = "inference-header-content-length"
EXTENSION = "binary_tensor_data"
MEDIA_TYPE = "application/octet-stream"


def split_body(body: bytes, declared: str) -> tuple[bytes, memoryview]:
    """The JSON header and the tensor bytes of a request with ``HEADER_LENGTH: declared``."""
    if not declared.isdigit() or int(declared) > len(body):
        raise InvalidInput(
            f"Inference-Header-Content-Length must be a byte count of at most the body's "
            f"{len(body)} bytes; got {declared[:32]!r}"
        )
    length = int(declared)
    return body[:length], memoryview(body)[length:]


def input_buffers(request: InferenceRequest, tail: memoryview) -> dict[str, memoryview]:
    """Each binary input's bytes, taken in order from ``tail``, which they must use up."""
    buffers: dict[str, memoryview] = {}
    offset = 0
    for item in request.inputs:
        size = (item.parameters or {}).get("binary_data_size")
        if size is None:
            continue
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise InvalidInput(f"input {item.name!r}: binary_data_size must be a byte count")
        if item.data is not None:
            raise InvalidInput(f"input {item.name!r} has both data and binary_data_size")
        if offset + size > len(tail):
            raise InvalidInput(
                f"input {item.name!r}: binary_data_size {size} runs past the "
                f"{len(tail)} bytes after the JSON header"
            )
        buffers[item.name] = tail[offset : offset + size]
        offset += size
    if offset != len(tail):
        raise InvalidInput(
            f"{len(tail)} bytes follow the JSON header but the inputs' binary_data_size "
            f"add up to {offset}"
        )
    return buffers


def wants_binary(request: InferenceRequest) -> bool:
    """Whether the answer's data goes as raw bytes: an output's own ``binary_data`` decides,
    else the request's ``binary_data_output``."""
    for output in request.outputs or []:
        value = (output.parameters or {}).get("binary_data")
        if value is not None:
            return value is True
    return (request.parameters or {}).get("binary_data_output") is True


def output_bytes(output: ResponseOutput) -> bytes:
    """An output's data as raw tensor bytes (``BYTES``: length-prefixed elements)."""
    if output.datatype == "BYTES":
        return bytes_tensor(output.data)
    return raw_bytes(np.asarray(output.data, dtype=numpy_dtype(output.datatype)))


@dataclass(frozen=True)
class BinaryAnswer:
    """An answer as the extension sends it: the JSON header, then the outputs' bytes."""

    body: bytes
    header_length: int


def binary_answer(response: InferenceResponse) -> BinaryAnswer:
    """``response`` with each output's data moved after the JSON header."""
    header: dict[str, Any] = response.model_dump(exclude_none=True)
    tensors = []
    for output, described in zip(response.outputs, header["outputs"], strict=True):
        data = output_bytes(output)
        described.pop("data")
        described["parameters"] = {**described.get("parameters", {}), "binary_data_size": len(data)}
        tensors.append(data)
    head = json.dumps(header, separators=(",", ":")).encode()
    return BinaryAnswer(head + b"".join(tensors), len(head))
