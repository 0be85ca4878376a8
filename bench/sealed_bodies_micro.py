"""What sealing gRPC bodies and reading sealed bodies back cost, per 64-row digits request.

Request path: the gRPC ingress serializes the ``ModelInferRequest`` it received once more (the
only added work there; sealing itself runs on the writer thread), next to the HPKE seal the
writer does per body. Offline: the verifier decodes a body of each encoding. Rounds are
interleaved and medians reported, as the host is shared.

    .venv/bin/python bench/sealed_bodies_micro.py [--rounds 30]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from functools import partial

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from protos import open_inference_pb2 as oip
from public_api.sealing import GRPC_MODEL_INFER, V2_JSON, seal, v2_binary_type
from shared.manifest import TensorSpec
from splitvault.ownership.bodies import decode_body

ROWS, REPEAT = 64, 20
SPECS = [TensorSpec(name="image", datatype="FP32", shape=[-1, 1, 8, 8])]


def _bodies(images: np.ndarray) -> dict[str, tuple[bytes, str]]:
    shape = list(images.shape)
    tensor = {"name": "image", "shape": shape, "datatype": "FP32"}
    plain = json.dumps({"inputs": [{**tensor, "data": images.ravel().tolist()}]}).encode()
    head = json.dumps(
        {"inputs": [{**tensor, "parameters": {"binary_data_size": images.nbytes}}]}
    ).encode()
    grpc = oip.ModelInferRequest(
        model_name="digits",
        inputs=[oip.ModelInferRequest.InferInputTensor(name="image", datatype="FP32", shape=shape)],
        raw_input_contents=[images.tobytes()],
    ).SerializeToString()
    return {
        "v2 JSON": (plain, V2_JSON),
        "v2 binary": (head + images.tobytes(), v2_binary_type(len(head))),
        "gRPC": (grpc, GRPC_MODEL_INFER),
    }


def _us(call: Callable[[], object]) -> float:
    started = time.perf_counter()
    for _ in range(REPEAT):
        call()
    return (time.perf_counter() - started) / REPEAT * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    images = np.random.default_rng(0).random((ROWS, 1, 8, 8), dtype=np.float32)
    bodies = _bodies(images)
    message = oip.ModelInferRequest.FromString(bodies["gRPC"][0])
    owner = X25519PrivateKey.generate().public_key()
    cases: dict[str, Callable[[], object]] = {
        "request path: serialize the gRPC message again": message.SerializeToString,
        "writer thread: HPKE seal of the gRPC body": lambda: seal(
            bodies["gRPC"][0], owner, time_s=0.0, key_id="k", model="m", request_id="r"
        ),
    }
    for name, (body, content_type) in bodies.items():
        cases[f"offline: decode a {name} body ({len(body):,} B)"] = partial(
            decode_body, body, content_type, SPECS
        )
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, call in cases.items():
            times[name].append(_us(call))
    print(f"{ROWS}-row digits request, medians of {args.rounds} interleaved rounds (shared host)")
    for name, values in times.items():
        print(f"  {name:55s} {statistics.median(values):9.1f} us")


if __name__ == "__main__":
    main()
