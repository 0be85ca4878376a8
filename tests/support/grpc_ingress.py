"""A plain grpcio client of the public tier's v2 gRPC ingress, from a chosen loopback address.

What a hostile client sends, with every status, message and trailing metadata entry read back
(``tritonclient.grpc`` keeps the trailers to itself). ``source``: the address the tier sees,
through a ``Relay`` (gRPC's C-core client cannot bind one itself).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from protos import open_inference_pb2 as oip
from tests.support.relay import Relay

SERVICE = "/inference.GRPCInferenceService/"


@dataclass(frozen=True)
class GrpcReply:
    """A call's status, its message and its trailing metadata (lower-case names)."""

    code: grpc.StatusCode
    message: str
    trailers: dict[str, str]


def infer_request(model: str, images: np.ndarray, **parameters: int | str) -> oip.ModelInferRequest:
    """``images`` (FP32) as the ``image`` input in ``raw_input_contents``, as tritonclient
    sends it; ``parameters`` as request parameters (integers as int64)."""
    tensor = oip.ModelInferRequest.InferInputTensor(
        name="image", datatype="FP32", shape=list(images.shape)
    )
    return oip.ModelInferRequest(
        model_name=model,
        inputs=[tensor],
        raw_input_contents=[np.ascontiguousarray(images, dtype=np.float32).tobytes()],
        parameters={name: _parameter(value) for name, value in parameters.items()},
    )


def _parameter(value: int | str) -> oip.InferParameter:
    if isinstance(value, int):
        return oip.InferParameter(int64_param=value)
    return oip.InferParameter(string_param=value)


class V2GrpcClient:
    """One TLS channel to the ingress on ``port`` (through a relay from ``source``, if given);
    calls on it share the channel, as a stock client's do. A context manager."""

    def __init__(self, port: int, ca: Path, source: str | None = None) -> None:
        self.relay = Relay(port, source) if source is not None else None
        target = f"localhost:{self.relay.port if self.relay is not None else port}"
        credentials = grpc.ssl_channel_credentials(ca.read_bytes())
        self.channel = grpc.secure_channel(target, credentials)

    def __enter__(self) -> V2GrpcClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.channel.close()
        if self.relay is not None:
            self.relay.close()

    def call(
        self,
        method: str,
        message: Any,
        key: str | None = None,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> GrpcReply:
        """``method`` of the v2 service with ``message`` (a message, or the bytes to send)."""
        stub = self.channel.unary_unary(
            SERVICE + method,
            request_serializer=lambda m: m if isinstance(m, bytes) else m.SerializeToString(),
            response_deserializer=bytes,
        )
        auth = () if key is None else (("authorization", f"Bearer {key}"),)
        try:
            _, call = stub.with_call(message, metadata=(*auth, *metadata), timeout=60)
        except grpc.RpcError as error:
            return GrpcReply(error.code(), error.details() or "", _text(error.trailing_metadata()))
        return GrpcReply(grpc.StatusCode.OK, "", _text(call.trailing_metadata()))

    def infer(
        self,
        images: np.ndarray,
        key: str | None = None,
        model: str = "digits",
        metadata: Sequence[tuple[str, str]] = (),
        **parameters: int | str,
    ) -> GrpcReply:
        """``ModelInfer`` of ``images`` by ``model``."""
        return self.call("ModelInfer", infer_request(model, images, **parameters), key, metadata)


def _text(metadata: Any) -> dict[str, str]:
    return {k: v for k, v in (metadata or ()) if isinstance(v, str)}
