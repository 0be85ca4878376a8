"""Per-request cost of customer request signatures: SDK signing, the public tier's checks, the
private tier's verification and nonce record (SQLite, WAL), and its registry lookup for an
unsigned request, for a digits request of 64 images.

    .venv/bin/python bench/signature_micro.py [--repeats N]

Prints the median and p90 of each step in microseconds; figures, never assertions.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from splitvault_client import RequestSigner, create_signing_key

from private_core.attribution import Attributor
from private_core.signers import SIGNATURES_DB, SqliteSignatureState
from protos import inference_pb2
from shared.manifest import DimSpec, StageManifest, TensorSpec
from shared.signatures import (
    SignedRequest,
    check_digest,
    check_time,
    load_public_key,
    signature_params,
    verify,
)

ROWS = 64
MANIFEST = StageManifest(
    model="digits",
    stage="back",
    file="back.pt2.enc",
    encrypted=True,
    sha256="0" * 64,
    inputs=[
        TensorSpec(
            name="h",
            datatype="FP16",
            shape=[DimSpec(name="batch", min=1, max=64), 16, 4, 4],
            source="front:h",
        )
    ],
    outputs=[
        TensorSpec(name="out", datatype="FP32", shape=[DimSpec(name="batch", min=1, max=64), 10])
    ],
    tiers={},
    torch_version="bench",
)


def _timed(step: Callable[[], object], repeats: int) -> tuple[float, float]:
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        samples.append((time.perf_counter() - started) * 1e6)
    samples.sort()
    return statistics.median(samples), samples[int(0.9 * (len(samples) - 1))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=2000)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="sigbench-"))
    create_signing_key(folder / "key.json", key_id="k_0123abcd", deployment="bench")
    signer = RequestSigner.load(folder / "key.json")
    images = np.random.default_rng(0).random((ROWS, 1, 8, 8), dtype=np.float32)
    body = json.dumps(
        {
            "inputs": [
                {
                    "name": "image",
                    "shape": [ROWS, 1, 8, 8],
                    "datatype": "FP32",
                    "data": images.ravel().tolist(),
                }
            ]
        }
    ).encode()
    shapes = {"image": (ROWS, 1, 8, 8)}
    headers = signer.headers("digits", body, shapes, 3)
    signed = SignedRequest.from_headers("POST", {k.lower(): v for k, v in headers.items()})
    assert signed is not None
    public_key = load_public_key(signer.public_key())
    state = SqliteSignatureState(folder / SIGNATURES_DB)
    state.register("k_0123abcd", public_key)
    attributor = Attributor(state, state, "bench", window_s=300.0)
    arrays = {"h": np.zeros((ROWS, 16, 4, 4), np.float16)}

    def public_checks() -> None:
        check_digest(signed, body)
        check_time(signature_params(signed).created, time.time(), 300.0)

    def fresh_request() -> inference_pb2.InferRequest:
        fresh = signer.headers("digits", body, shapes, 3)
        wire = SignedRequest.from_headers("POST", {k.lower(): v for k, v in fresh.items()})
        assert wire is not None
        signature = inference_pb2.RequestSignature(**wire.record())
        return inference_pb2.InferRequest(
            model="digits", top_k=3, key_id="k_0123abcd", signature=signature
        )

    async def attribution_times(count: int) -> tuple[float, float]:
        """Verify, check claims and record the nonce (synced), as the private tier does."""
        requests = [fresh_request() for _ in range(count)]
        samples = []
        for request in requests:
            started = time.perf_counter()
            await attributor.attribute(request, MANIFEST, arrays, {"batch": ROWS})
            samples.append((time.perf_counter() - started) * 1e6)
        samples.sort()
        return statistics.median(samples), samples[int(0.9 * (len(samples) - 1))]

    async def unsigned_times(count: int) -> tuple[float, float]:
        """A bearer key's request: is a signer registered for its key id?"""
        request = inference_pb2.InferRequest(model="digits", top_k=3, key_id="k_bearer00")
        samples = []
        for _ in range(count):
            started = time.perf_counter()
            await attributor.attribute(request, MANIFEST, arrays, {"batch": ROWS})
            samples.append((time.perf_counter() - started) * 1e6)
        samples.sort()
        return statistics.median(samples), samples[int(0.9 * (len(samples) - 1))]

    steps: list[tuple[str, Callable[[], object]]] = [
        ("SDK: sign (claims, digest of the JSON body, Ed25519)", lambda: signer.headers("digits", body, shapes, 3)),
        ("public tier: digest + time checks", public_checks),
        ("private tier: verify only (RFC 9421 base + Ed25519)", lambda: verify(signed, public_key, now=time.time(), window_s=300.0)),
    ]  # fmt: skip
    print(f"body: {len(body):,} bytes ({ROWS} digits images as v2 JSON); repeats {args.repeats}")
    for name, step in steps:
        median, p90 = _timed(step, args.repeats)
        print(f"  {name:58s} median {median:8.1f} us   p90 {p90:8.1f} us")
    median, p90 = asyncio.run(attribution_times(max(50, args.repeats // 10)))
    name = "private tier: attribution (verify, claims, nonce recorded)"
    print(f"  {name:58s} median {median:8.1f} us   p90 {p90:8.1f} us")
    median, p90 = asyncio.run(unsigned_times(args.repeats))
    name = "private tier: an unsigned request's key id (registry lookup)"
    print(f"  {name:58s} median {median:8.1f} us   p90 {p90:8.1f} us")
    state.close()


if __name__ == "__main__":
    main()
