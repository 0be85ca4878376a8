"""Binary tensor data extension vs JSON tensors: body size and the public tier's decode time.

Measures, in process, what the public tier does with an inference body before the front
stage runs: JSON (``json.loads``, the v2 model, ``array_from_json``) against binary (split the
header, the v2 model, ``input_buffers``, ``array_from_bytes``), for 224x224x3 FP32 images.
No network and no model: it isolates the part of a request the extension changes.

    python -m bench.binary_tensors [--batch 1 8] [--repeat 5]
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from public_api.binary import input_buffers, split_body
from public_api.v2 import InferenceRequest
from shared.tensor_codec import array_from_bytes, array_from_json

MAX_ELEMENTS = 64 * 1024 * 1024


def json_body(images: np.ndarray) -> bytes:
    tensor = {
        "name": "image",
        "shape": list(images.shape),
        "datatype": "FP32",
        "data": images.ravel().tolist(),
    }
    return json.dumps({"inputs": [tensor]}).encode()


def binary_body(images: np.ndarray) -> tuple[bytes, int]:
    raw = images.tobytes()
    tensor = {
        "name": "image",
        "shape": list(images.shape),
        "datatype": "FP32",
        "parameters": {"binary_data_size": len(raw)},
    }
    header = json.dumps({"inputs": [tensor]}).encode()
    return header + raw, len(header)


def decode_json(body: bytes) -> Any:
    request = InferenceRequest.model_validate(json.loads(body))
    item = request.inputs[0]
    return array_from_json(item.data, item.datatype, item.shape, max_elements=MAX_ELEMENTS)


def decode_binary(body: bytes, header_length: int) -> Any:
    head, tail = split_body(body, str(header_length))
    request = InferenceRequest.model_validate(json.loads(head))
    item = request.inputs[0]
    raw = input_buffers(request, tail)[item.name]
    return array_from_bytes(raw, item.datatype, item.shape, max_elements=MAX_ELEMENTS)


def timed(run: Callable[[], Any], repeat: int) -> float:
    """Median seconds of ``repeat`` runs."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print("batch | JSON body MB | binary body MB | JSON decode ms | binary decode ms | ratio")
    for batch in args.batch:
        images = rng.uniform(0, 1, (batch, 3, 224, 224)).astype(np.float32)
        as_json = json_body(images)
        as_binary, header_length = binary_body(images)
        assert np.array_equal(decode_json(as_json), decode_binary(as_binary, header_length))
        slow = timed(functools.partial(decode_json, as_json), args.repeat)
        fast = timed(functools.partial(decode_binary, as_binary, header_length), args.repeat)
        print(
            f"{batch} | {len(as_json) / 1e6:.1f} | {len(as_binary) / 1e6:.1f} | "
            f"{slow * 1000:.0f} | {fast * 1000:.2f} | {slow / fast:.0f}x"
        )


if __name__ == "__main__":
    main()
