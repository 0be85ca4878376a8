"""CPU the private tier's checks cost per request: monitor on against off, side by side.

Packs the digits demo and MiniLM (each with its reference profile) into a temporary deployment,
starts two private tiers, one at its defaults (admission, signature lookup, activation monitor)
and one with the activation monitor off, and sends each model's natural single-row requests
(held-out digits; standard-library sentences not in MiniLM's reference) 32 at once to both,
with the public tier's certificate. Reports the private process's CPU per request on each tier,
the ratio on/off, and the monitor's own CPU per request (its ``_cpu_seconds_total`` metric)
as a share of the tier's CPU per request with the monitor off. Admission and the
signature registry lookup run on both tiers (no setting switches them off); their cost is the
in-process figure printed last (and ``bench/signature_micro.py`` for a signed request).

Run from the repository root:  .venv/bin/python bench/private_checks_cpu.py [--requests N]
[--per-call K] (K requests per ``InferBatch`` call, as the public tier sends them together)
"""

# ruff: noqa: E402 - the repository root goes on sys.path before the project imports.
from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import argparse
import re
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

import grpc
import httpx
import numpy as np
import torch

from bench.compromised_public import cpu_seconds
from protos import inference_pb2, inference_pb2_grpc
from shared.keys import LocalFileKeyProvider
from shared.layout import FRONT_FILE, PRIVATE_IDENTITY, DeployLayout
from shared.manifest import RoundingPolicy, TopKPolicy, read_manifest
from shared.tensor_codec import to_proto
from splitvault.assess.data import docstring_sentences
from splitvault.demo import digits, minilm
from splitvault.deploy import init_deployment
from splitvault.launcher import TierProcess, start_private
from splitvault.packing.pack import pack_spec

CONCURRENCY = 32
Request = inference_pb2.InferRequest


def pack_both(layout: DeployLayout) -> None:
    """The digits CNN (top-3) and MiniLM (rounded), each with its reference profile."""
    provider = LocalFileKeyProvider.load(layout.kek)
    data = digits.load_data()
    spec = digits.spec_for(digits.train(data), data)
    pack_spec(
        spec,
        name="digits",
        split=digits.SPLIT,
        layout=layout,
        provider=provider,
        policy=TopKPolicy(k=3),
        show_progress=False,
    )
    pack_spec(
        minilm.factory(),
        name="minilm",
        split=minilm.SPLIT,
        layout=layout,
        provider=provider,
        policy=RoundingPolicy(decimals=5),
        show_progress=False,
    )


def front(layout: DeployLayout, model: str) -> Callable[..., tuple[torch.Tensor, ...]]:
    module = torch.export.load(str(layout.public.model(model) / FRONT_FILE)).module()
    return module


def digits_requests(layout: DeployLayout, pairing: str) -> list[Request]:
    """One held-out digit per request, as the public tier would send it."""
    (spec,) = read_manifest(layout.private.model("digits")).inputs
    with torch.inference_mode():
        (out,) = front(layout, "digits")(torch.from_numpy(digits.load_data().test_x))
    rows = out.numpy().astype(np.float16)
    return [
        Request(
            model="digits",
            inputs=[to_proto(spec.name, row[None])],
            key_id=f"k{i % 50}",
            top_k=3,
            pairing_id=pairing,
        )
        for i, row in enumerate(rows)
    ]


def minilm_requests(layout: DeployLayout, pairing: str, count: int = 400) -> list[Request]:
    """One natural sentence per request, none of them in the reference profile."""
    hidden, mask = (spec.name for spec in read_manifest(layout.private.model("minilm")).inputs)
    reference = set(minilm.reference_sentences())
    sentences = [s for s in docstring_sentences() if s not in reference][:count]
    tokenizer, module, requests = minilm.load_tokenizer(), front(layout, "minilm"), []
    for i, sentence in enumerate(sentences):
        tokens = tokenizer([sentence], return_tensors="pt", truncation=True, max_length=128)
        with torch.inference_mode():
            (out,) = module(tokens["input_ids"], tokens["attention_mask"])
        inputs = [
            to_proto(hidden, out.numpy().astype(np.float16)),
            to_proto(mask, tokens["attention_mask"].numpy()),
        ]
        requests.append(
            Request(model="minilm", inputs=inputs, key_id=f"k{i % 50}", pairing_id=pairing)
        )
    return requests


def stub(layout: DeployLayout, port: int) -> inference_pb2_grpc.PrivateInferenceStub:
    tls = layout.public.tls
    credentials = grpc.ssl_channel_credentials(
        root_certificates=layout.public.ca_cert.read_bytes(),
        private_key=(tls / "client.key").read_bytes(),
        certificate_chain=(tls / "client.crt").read_bytes(),
    )
    options = [("grpc.ssl_target_name_override", PRIVATE_IDENTITY)]
    channel = grpc.secure_channel(f"127.0.0.1:{port}", credentials, options=options)
    return inference_pb2_grpc.PrivateInferenceStub(channel)


def caller(
    target: inference_pb2_grpc.PrivateInferenceStub,
) -> Callable[[Sequence[Request]], object]:
    """Sends one request as ``Infer``, several in one ``InferBatch`` call (as the public tier
    sends the requests it has ready together); any refusal fails the benchmark."""

    def call(requests: Sequence[Request]) -> object:
        if len(requests) == 1:
            return target.Infer(requests[0], timeout=60)
        batch = inference_pb2.InferBatchRequest(requests=requests)
        results = [r for reply in target.InferBatch(batch, timeout=60) for r in reply.results]
        if len(results) != len(requests) or any(r.HasField("error") for r in results):
            raise RuntimeError(f"a batch call was not answered whole: {results!r:.300}")
        return results

    return call


def cpu_per_request(
    tier: TierProcess,
    call: Callable[[Sequence[Request]], object],
    requests: Sequence[Request],
    n: int,
    per_call: int = 1,
) -> float:
    """The tier's process CPU per request (ms), ``n`` requests, 32 in flight: in calls of
    ``per_call`` requests (``CONCURRENCY // per_call`` calls in flight)."""

    def group(start: int) -> list[Request]:
        return [requests[(start + i) % len(requests)] for i in range(per_call)]

    with ThreadPoolExecutor(max(CONCURRENCY // per_call, 1)) as pool:
        list(pool.map(lambda i: call(group(i * per_call)), range(200 // per_call)))  # warm-up
        before = cpu_seconds(tier.process.pid)
        calls = n // per_call
        list(pool.map(lambda i: call(group(i * per_call)), range(calls)))
        return (cpu_seconds(tier.process.pid) - before) * 1000 / (calls * per_call)


def run(
    workdir: Path,
    stack: ExitStack,
    n: int,
    rounds: int,
    compare: str | None,
    models: Sequence[str],
    per_call: int = 1,
) -> None:
    layout = init_deployment(workdir / "deploy")
    pack_both(layout)
    base = {"SPLITVAULT_PRIVATE_TORCH_THREADS": "1"}

    def own_state(name: str) -> dict[str, str]:  # a private tier locks its state folder
        return {**base, "SPLITVAULT_PRIVATE_STATE_DIR": str(layout.private.root / f"state-{name}")}

    monitor_off = {"SPLITVAULT_PRIVATE_ACTIVATION_MONITOR__ENABLED": "false"}
    tiers = {
        "on": start_private(layout.root, env=own_state("on")),
        "off": start_private(layout.root, env={**own_state("off"), **monitor_off}),
    }
    if compare is not None:  # the monitor on, in the code of another revision
        tiers[compare] = start_private(
            layout.root, env=own_state("compare"), cwd=checkout(compare, workdir)
        )
    for name, tier in tiers.items():
        stack.callback(tier.stop)
        print(f"tier {name}: pid {tier.process.pid}", flush=True)
    stubs = {name: stub(layout, tier.port) for name, tier in tiers.items()}
    workloads = {
        model: (digits_requests if model == "digits" else minilm_requests)(
            layout, read_manifest(layout.public.model(model)).pairing_id or ""
        )
        for model in models
    }
    print(
        f"private tier CPU per single-row request, c={CONCURRENCY}, {n} requests per round, "
        f"{per_call} per call"
    )
    monitored = [name for name in tiers if name != "off"]
    for model, requests in workloads.items():
        ms: dict[str, list[float]] = {name: [] for name in tiers}
        spent = {name: monitor_seconds(tiers[name], model) for name in monitored}
        groups = batch_sizes(tiers["on"], model)
        for index in range(rounds):  # rotate which tier goes first
            names = list(tiers)
            for name in names[index % len(names) :] + names[: index % len(names)]:
                call = caller(stubs[name])
                ms[name].append(cpu_per_request(tiers[name], call, requests, n, per_call))
            print(
                f"  {model} round {index + 1}: "
                + ", ".join(f"{name} {ms[name][-1]:.3f} ms" for name in tiers),
                flush=True,
            )
        histogram = {
            size: count - groups.get(size, 0)
            for size, count in batch_sizes(tiers["on"], model).items()
        }
        print(f"  {model}: requests per batch (scored group) on 'on', <= bucket: {histogram}")
        off = np.asarray(ms["off"])
        for name in monitored:
            total, count = monitor_seconds(tiers[name], model)
            own = 1000 * (total - spent[name][0]) / max(count - spent[name][1], 1.0)
            ratios = np.asarray(ms[name]) / off
            low, high = np.percentile(ratios, [25, 75])
            print(
                f"  {model} [{name}]: process CPU {name}/off, median of {rounds}: "
                f"{np.median(ratios):.3f} (quartiles {low:.3f}-{high:.3f}, all rounds pooled "
                f"{np.sum(ms[name]) / np.sum(off):.3f}); the monitor's own CPU "
                f"{own:.4f} ms per request = {100 * own / np.median(off):.1f}% of the tier's "
                "CPU per request with it off (target <= 5%)"
            )


def checkout(ref: str, workdir: Path) -> Path:
    """The files of git revision ``ref`` in a folder of ``workdir`` (to run that code)."""
    folder = workdir / "checkout"
    folder.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "archive", ref], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder


def batch_sizes(tier: TierProcess, model: str) -> dict[str, float]:
    """The tier's cumulative batch-size histogram for ``model``: {upper bound: batches}."""
    text = httpx.get(tier.metrics_url).text
    found = re.findall(
        rf'splitvault_private_batch_size_bucket{{le="([^"]+)",model="{model}"}} (\S+)', text
    )
    cumulative = {bound: float(value) for bound, value in found}
    counts, below = {}, 0.0
    for bound, value in cumulative.items():
        counts[bound], below = value - below, value
    return counts


def monitor_seconds(tier: TierProcess, model: str) -> tuple[float, float]:
    """The monitor's CPU seconds for ``model`` and the requests it checked: (cpu, count)."""
    text = httpx.get(tier.metrics_url).text

    def value(name: str) -> float:
        found = re.search(rf'{name}{{model="{model}"}} (\S+)', text)
        return float(found.group(1)) if found else 0.0

    return (
        value("splitvault_private_monitor_cpu_seconds_total"),
        value("splitvault_private_monitor_seconds_count"),
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--compare",
        metavar="REF",
        help="also run a monitor-on tier from git revision REF (e.g. main), side by side",
    )
    parser.add_argument(
        "--models",
        default="digits,minilm",
        help="comma-separated models to measure (both are packed either way)",
    )
    parser.add_argument(
        "--per-call",
        type=int,
        default=1,
        help="requests per call: 1 sends Infer calls, more sends InferBatch calls as the "
        "public tier does with the requests it has ready together (digits at c=32 through the "
        "public tier: about 5); --compare then needs a revision that has InferBatch",
    )
    args = parser.parse_args(argv)
    models = [name for name in args.models.split(",") if name]
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        run(Path(tmp), stack, args.requests, args.rounds, args.compare, models, args.per_call)


if __name__ == "__main__":
    main()
