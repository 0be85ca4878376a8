"""Private-tier throughput with dynamic batching on and off, at a fixed concurrency.

Two private tiers run side by side on one deployment: one with the default batching, one with
batching off (``max_batch_size=1``, no queue delay, two batches at once: the pre-batching
behaviour). Closed-loop async clients send the same precomputed request (front activations of
one digits image, or of one MiniLM sentence at 128 tokens) straight over mutual-TLS gRPC, so
the public tier is not in the way. Rounds alternate between the two tiers.

Run from the repository root:
    .venv/bin/python bench/batching_micro.py --concurrency 32 --seconds 5 --rounds 2
"""

# ruff: noqa: E402 - the repository root goes on sys.path before the project imports.
from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import argparse
import asyncio
import os
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from typing import Any

import httpx
import numpy as np
import torch
from prometheus_client.parser import text_string_to_metric_families

from protos import inference_pb2
from public_api.front import load_front_stages
from public_api.private_client import PrivateTierClient
from public_api.settings import PublicSettings
from shared.keys import LocalFileKeyProvider
from shared.layout import DeployLayout
from shared.manifest import RoundingPolicy, TopKPolicy
from shared.tensor_codec import to_proto
from splitvault.demo import digits, minilm
from splitvault.deploy import init_deployment
from splitvault.launcher import TierProcess, start_private
from splitvault.packing.pack import pack_spec

OFF = {
    "SPLITVAULT_PRIVATE_MAX_BATCH_SIZE": "1",
    "SPLITVAULT_PRIVATE_MAX_QUEUE_DELAY_US": "0",
    "SPLITVAULT_PRIVATE_CONCURRENT_BATCHES": "2",
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--deploy", type=Path, help="a deployment with digits and minilm packed")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=5.0, help="per round and mode")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--private-threads", type=int, default=1)
    parser.add_argument("--models", default="digits,minilm")
    parser.add_argument("--delay-us", type=int, default=2000, help="batching on: queue delay")
    return parser.parse_args(argv)


def pack(layout: DeployLayout) -> None:
    """Train and pack digits (top-3) and pack MiniLM (rounding) into ``layout``."""
    provider = LocalFileKeyProvider.load(layout.kek)
    data = digits.load_data()
    common: dict[str, Any] = {"layout": layout, "provider": provider, "show_progress": False}
    spec = digits.spec_for(digits.train(data), data)
    pack_spec(spec, name="digits", split=digits.SPLIT, policy=TopKPolicy(k=3), **common)
    pack_spec(
        minilm.factory(), name="minilm", split=minilm.SPLIT, policy=RoundingPolicy(), **common
    )


def request_for(layout: DeployLayout, model: str) -> inference_pb2.InferRequest:
    """What the public tier would send for one digits image or one 128-token sentence."""
    stage = load_front_stages(layout.public)[model]
    if model == "digits":
        inputs = {"image": digits.load_data().test_x[:1]}
    else:
        tokens = minilm.tokenize(minilm.SENTENCES[:1], length=128)
        inputs = {name: tensor.numpy() for name, tensor in tokens.items()}
    with torch.inference_mode():
        outputs = stage.module(*(torch.from_numpy(inputs[s.name]) for s in stage.manifest.inputs))
    transport = np.dtype(np.float16 if stage.config.transport_datatype == "FP16" else np.float32)
    tensors = [
        to_proto(spec.name, tensor.numpy().astype(transport))
        for spec, tensor in zip(stage.manifest.outputs, outputs, strict=True)
    ]
    tensors += [to_proto(name, inputs[name]) for name in stage.manifest.forward_inputs]
    return inference_pb2.InferRequest(
        model=model, inputs=tensors, pairing_id=stage.manifest.pairing_id or ""
    )


async def closed_loop(
    client: PrivateTierClient, request: inference_pb2.InferRequest, workers: int, seconds: float
) -> list[float]:
    """``workers`` clients, each sending its next request when the last is answered."""
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            await client.infer(request)
            latencies.append(time.perf_counter() - started)

    await asyncio.gather(*(worker() for _ in range(workers)))
    return latencies


def cpu_seconds(tier: TierProcess) -> float:
    """CPU time (user + system) the tier's process has used; NaN where /proc is missing."""
    try:
        fields = Path(f"/proc/{tier.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def batch_stats(tier: TierProcess, model: str) -> tuple[float, float]:
    """(batches, rows) the tier has run for ``model`` so far, from its metrics port."""
    port = next(
        e["metrics_port"] for e in tier.events() if e.get("event") == "private_tier_listening"
    )
    body = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    values = {
        s.name: s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
        if s.labels.get("model") == model and s.name.startswith("splitvault_private_batch_size")
    }
    return values.get("splitvault_private_batch_size_count", 0.0), values.get(
        "splitvault_private_batch_size_sum", 0.0
    )


async def measure(
    layout: DeployLayout, tiers: dict[str, TierProcess], model: str, args: argparse.Namespace
) -> dict[str, tuple[float, float, float, float, float]]:
    """mode -> (requests/s, p50 ms, p99 ms, mean rows per batch, tier CPU ms per request)."""
    request = request_for(layout, model)
    clients = {
        mode: PrivateTierClient(
            PublicSettings(tier_dir=layout.public.root, private_addresses=[f"127.0.0.1:{t.port}"])
        )
        for mode, t in tiers.items()
    }
    latencies: dict[str, list[float]] = {mode: [] for mode in tiers}
    elapsed, cpu = dict.fromkeys(tiers, 0.0), dict.fromkeys(tiers, 0.0)
    before = {mode: batch_stats(t, model) for mode, t in tiers.items()}
    for mode, client in clients.items():  # warm-up
        await closed_loop(client, request, args.concurrency, 1.0)
        before[mode] = batch_stats(tiers[mode], model)
    for round_index in range(args.rounds):
        order = list(clients) if round_index % 2 == 0 else list(reversed(clients))
        for mode in order:
            started, used = time.perf_counter(), cpu_seconds(tiers[mode])
            latencies[mode] += await closed_loop(
                clients[mode], request, args.concurrency, args.seconds
            )
            elapsed[mode] += time.perf_counter() - started
            cpu[mode] += cpu_seconds(tiers[mode]) - used
    results = {}
    for mode, client in clients.items():
        await client.close()
        after = batch_stats(tiers[mode], model)
        mean_rows = (after[1] - before[mode][1]) / max(1.0, after[0] - before[mode][0])
        times = np.array(latencies[mode]) * 1000
        results[mode] = (
            len(times) / elapsed[mode],
            float(np.percentile(times, 50)),
            float(np.percentile(times, 99)),
            mean_rows,
            cpu[mode] * 1000 / len(times),
        )
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Start both private tiers, measure each model, print a table."""
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    threads = {"SPLITVAULT_PRIVATE_TORCH_THREADS": str(args.private_threads)}
    with ExitStack() as stack:
        if args.deploy is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sv-batch-")))
            layout = init_deployment(workdir / "deploy")
            pack(layout)
        else:
            layout = DeployLayout(args.deploy)
        batching = {**threads, "SPLITVAULT_PRIVATE_MAX_QUEUE_DELAY_US": str(args.delay_us)}
        # Each tier locks its state folder: the second gets one of its own.
        own_state = {"SPLITVAULT_PRIVATE_STATE_DIR": str(layout.private.root / "state-off")}
        tiers = {
            "on": start_private(layout.root, env=batching),
            "off": start_private(layout.root, env={**threads, **OFF, **own_state}),
        }
        for tier in tiers.values():
            stack.callback(tier.stop)
        print(
            f"concurrency {args.concurrency}, {args.rounds} x {args.seconds:g} s per mode, "
            f"queue delay {args.delay_us} us, private torch threads {args.private_threads}, "
            f"{os.cpu_count()} CPUs"
        )
        print("model   batching    req/s   p50 ms   p99 ms  rows/batch  CPU ms/req")
        for model in args.models.split(","):
            results = asyncio.run(measure(layout, tiers, model, args))
            for mode, (rate, p50, p99, rows, cpu_ms) in results.items():
                print(
                    f"{model:<7} {mode:<9} {rate:8.1f} {p50:8.2f} {p99:8.2f} {rows:10.1f} "
                    f"{cpu_ms:11.2f}"
                )
            on, off = results["on"], results["off"]
            print(
                f"{model:<7} on/off: throughput {on[0] / off[0]:.2f}x, "
                f"CPU per request {on[4] / off[4]:.2f}x"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
