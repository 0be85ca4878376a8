"""The activation monitor's own CPU per single-row request, in process, by group size.

A synthetic digits-shaped profile (16 channels of 8x8 as the digits demo's front sends, post-ReLU
rows of 64 latent factors),
one key id and one identity, groups of G single-row requests as the batch worker hands them to
``ActivationMonitor.check_many``; thread CPU per request. Compare two checkouts by running it
from each with ``PYTHONPATH``, alternating.

Run from the repository root:  .venv/bin/python bench/monitor_groups_micro.py [G ...]
"""

# ruff: noqa: E402 - the repository root goes on sys.path before the project imports.
from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import argparse
import time

import numpy as np
from prometheus_client import CollectorRegistry

from private_core.activation_monitor import ActivationMonitor, single_threaded_blas
from private_core.activation_profile import build_profile
from private_core.monitor_settings import ActivationMonitorSettings
from protos import inference_pb2
from shared.manifest import DimSpec, TensorSpec

SHAPE = (16, 8, 8)  # the digits demo: after the first convolution and its ReLU
WIDTH = 16 * 8 * 8
SPEC = TensorSpec(
    name="act",
    datatype="FP16",
    shape=[DimSpec(name="batch", min=1, max=64), *SHAPE],
    source="front:act",
)


def natural(rng: np.random.Generator, base: np.ndarray, n: int) -> np.ndarray:
    latent = rng.standard_normal((n, 64)).astype(np.float32)
    return np.asarray(np.maximum(latent @ base * 0.3 - 0.2, 0), np.float16)


def per_request(group: int, requests: int, keys: int = 1) -> float:
    """Microseconds of thread CPU per request in groups of ``group``, the requests cycling
    through ``keys`` key ids (``bench/private_checks_cpu.py`` uses 50)."""
    rng = np.random.default_rng(1)
    base = rng.standard_normal((64, WIDTH)).astype(np.float32)
    profile = build_profile(natural(rng, base, 3000), channels=SHAPE[0])
    monitor = ActivationMonitor(
        ActivationMonitorSettings(), {"digits": ([SPEC], profile)}, CollectorRegistry()
    )
    rows = natural(rng, base, requests).reshape(-1, 1, *SHAPE)
    identity = ("splitvault-public",)
    calls = [
        (inference_pb2.InferRequest(model="digits", key_id=f"k{i % keys}"), identity)
        for i in range(requests)
    ]
    decoded = [{"act": row} for row in rows]
    groups = [slice(start, start + group) for start in range(0, requests - group + 1, group)]
    warm = len(groups) // 10
    for span in groups[:warm]:
        monitor.check_many(calls[span], decoded[span])
    started = time.thread_time()
    for span in groups[warm:]:
        monitor.check_many(calls[span], decoded[span])
    return 1e6 * (time.thread_time() - started) / (group * (len(groups) - warm))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("groups", type=int, nargs="*", default=[1, 2, 4, 8, 32])
    parser.add_argument("--requests", type=int, default=12800)
    parser.add_argument("--keys", type=int, default=1, help="key ids the requests cycle through")
    args = parser.parse_args()
    single_threaded_blas()
    for group in args.groups:
        cost = per_request(group, args.requests, args.keys)
        print(f"groups of {group:>2}: {cost:6.1f} us per request")


if __name__ == "__main__":
    main()
