"""v2 gRPC messages to and from the v2 REST models the service speaks, and the peer's address.

A ``ModelInferRequest`` becomes the ``InferenceRequest`` a REST client would have sent, with
its raw tensors (``raw_input_contents``) beside it, so that both ingresses decode through the
same code; an answer goes back with its data in ``raw_output_contents``, as Triton sends it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import unquote

from pydantic import ValidationError

from protos import open_inference_pb2 as oip
from public_api.binary import output_bytes
from public_api.v2 import InferenceRequest, InferenceResponse, ModelMetadata
from shared.errors import InvalidInput

# Which typed field of InferTensorContents carries each datatype (FP16 travels raw only).
_CONTENTS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",  # sentences, for a model that takes text
}


def infer_request(message: oip.ModelInferRequest) -> tuple[InferenceRequest, dict[str, bytes]]:
    """The v2 request of ``message`` and its raw input tensors by name (400 if malformed)."""
    raw = list(message.raw_input_contents)
    if raw and len(raw) != len(message.inputs):
        raise InvalidInput(
            f"raw_input_contents has {len(raw)} entries for {len(message.inputs)} inputs"
        )
    if raw and any(item.HasField("contents") for item in message.inputs):
        raise InvalidInput("an input has contents although raw_input_contents is used")
    document = {
        "id": message.id or None,
        "parameters": _parameters(message.parameters) or None,
        "inputs": [_input(item) for item in message.inputs],
        "outputs": [
            {"name": out.name, "parameters": _parameters(out.parameters) or None}
            for out in message.outputs
        ]
        or None,
    }
    try:
        request = InferenceRequest.model_validate(document)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise InvalidInput(f"invalid request: {where}: {first['msg']}") from None
    return request, {item.name: data for item, data in zip(message.inputs, raw, strict=False)}


def _input(item: oip.ModelInferRequest.InferInputTensor) -> dict[str, Any]:
    field = _CONTENTS.get(item.datatype)
    values = getattr(item.contents, field) if field and item.HasField("contents") else None
    return {
        "name": item.name,
        "shape": list(item.shape),
        "datatype": item.datatype,
        "data": None if values is None else list(values),
        "parameters": _parameters(item.parameters) or None,
    }


def _parameters(parameters: Mapping[str, oip.InferParameter]) -> dict[str, Any]:
    return {
        name: getattr(value, choice)
        for name, value in parameters.items()
        if (choice := value.WhichOneof("parameter_choice")) is not None
    }


def infer_response(response: InferenceResponse) -> oip.ModelInferResponse:
    """The gRPC answer: each output's data as raw bytes, in the order of ``outputs``."""
    return oip.ModelInferResponse(
        model_name=response.model_name,
        model_version=response.model_version or "",
        id=response.id or "",
        outputs=[
            oip.ModelInferResponse.InferOutputTensor(
                name=out.name, datatype=out.datatype, shape=out.shape
            )
            for out in response.outputs
        ],
        raw_output_contents=[output_bytes(out) for out in response.outputs],
        parameters=_answer_parameters(response.parameters or {}),
    )


def _answer_parameters(parameters: Mapping[str, Any]) -> dict[str, oip.InferParameter]:
    """An answer's parameters (a text request's usage): integers as int64, the rest as JSON."""
    return {
        name: oip.InferParameter(int64_param=value)
        if isinstance(value, int) and not isinstance(value, bool)
        else oip.InferParameter(string_param=json.dumps(value))
        for name, value in parameters.items()
    }


def metadata_response(metadata: ModelMetadata) -> oip.ModelMetadataResponse:
    """``ModelMetadata`` without its parameters (the message has no field for them)."""
    tensor = oip.ModelMetadataResponse.TensorMetadata
    return oip.ModelMetadataResponse(
        name=metadata.name,
        versions=metadata.versions,
        platform=metadata.platform,
        inputs=[tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in metadata.inputs],
        outputs=[tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in metadata.outputs],
    )


def peer_address(peer: str) -> str:
    """The client's IP address from gRPC's peer string (``ipv4:1.2.3.4:5``, ``ipv6:[::1]:5``);
    never from metadata, which the client writes."""
    kind, _, rest = unquote(peer).partition(":")
    host = rest.rpartition(":")[0]
    if kind == "ipv4" and host:
        return host
    if kind == "ipv6" and host:
        return host.strip("[]")
    return "unknown"


def header(metadata: Iterable[tuple[str, str | bytes]], name: str) -> str | None:
    """The first value of a text metadata entry."""
    for key, value in metadata:
        if key == name and isinstance(value, str):
            return value
    return None
