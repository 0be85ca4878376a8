"""splitvault against the servers a user would deploy instead, side by side on one host.

Measures the digits CNN and MiniLM (128 tokens) on: the raw model in-process (the ceiling), a
plain FastAPI server, LitServe with batching, and splitvault's two tiers with protections on
and off; closed-loop clients at several concurrency levels. Prints the tables, writes them
into BENCHMARKS.md and the plots into docs/benchmarks/.

Run from the repository root:  .venv/bin/python bench/serving_comparison.py [--quick]
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
import dataclasses
import datetime as dt
import json
import os
import platform
import shlex
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from types import FrameType
from typing import Any

import httpx
import numpy as np
import torch

from bench import phase_breakdown, serving_profile, split_compute
from bench.loadgen import LoadSpec, run_load
from bench.serving_report import Fidelity, Point, RawCeiling, Report, plot, render, write_section
from bench.serving_systems import (
    Endpoint,
    ServerConfig,
    environment_pairs,
    mapping_note,
    running,
    suspended,
    systems,
    tree_cpu_seconds,
)
from shared.keys import LocalFileKeyProvider
from shared.layout import DeployLayout
from shared.manifest import RoundingPolicy, TopKPolicy
from splitvault.demo import digits
from splitvault.deploy import init_deployment
from splitvault.packing.pack import pack_spec
from splitvault.packing.spec import ModelSpec

ALL_MODELS = ("digits", "minilm")
ALL_SYSTEMS = (
    "fastapi",
    "litserve",
    "splitvault",
    "splitvault-open",
    "splitvault-fixed",
    "splitvault-unbatched",
    "splitvault-base",
)
# protected, on their own state
VARIANTS = ("splitvault-fixed", "splitvault-unbatched", "splitvault-base")
DEFAULT_SYSTEMS = ("fastapi", "litserve", "splitvault", "splitvault-open")
DECIMALS = 8  # output-policy rounding far below the FP16 transport error
FIDELITY_IMAGES = 200
FIDELITY_CHUNK = 50


@dataclass(frozen=True)
class Workload:
    """One model: its request bodies and its in-process forward for the raw ceiling."""

    model: str
    path: str
    bodies: list[bytes]
    samples: int
    module: torch.nn.Module
    make_batch: Callable[[int], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class Prepared:
    """The deployment and what was packed into it."""

    layout: DeployLayout
    digits_data: digits.DigitsData
    specs: dict[str, ModelSpec]
    digits_state: Path
    packed: tuple[str, ...]


def _csv(kind: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    return lambda text: [kind(item) for item in text.split(",") if item.strip()]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line flags (``--quick``: short points, results under bench/results/)."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    add = parser.add_argument
    add("--quick", action="store_true", help="smoke run: 2 s points, written to bench/results/")
    add("--models", type=_csv(str), default=list(ALL_MODELS), help="digits,minilm")
    add("--systems", type=_csv(str), default=list(DEFAULT_SYSTEMS), help=",".join(ALL_SYSTEMS))
    add("--concurrency", type=_csv(int), default=[1, 8, 32, 64], help="client counts")
    add("--duration", type=float, default=None, help="measured seconds per point (8)")
    add("--warmup", type=float, default=None, help="warm-up seconds per point (3)")
    add("--rounds", type=int, default=None, help="rounds per point, median reported (2)")
    add("--raw-batches", type=_csv(int), default=[1, 8, 32, 64], help="raw model batch sizes")
    add("--raw-seconds", type=float, default=None, help="seconds per raw batch size (3)")
    add("--batch", type=int, default=1, help="samples per request")
    add("--seq", type=int, default=128, help="MiniLM sequence length")
    add("--threads", type=int, default=os.cpu_count() or 1, help="torch thread budget per system")
    add("--private-threads", type=int, default=None, help="splitvault private tier's share")
    add("--public-threads", type=int, default=None, help="splitvault public tier's share")
    add("--litserve-batch", type=int, default=32, help="LitServe max_batch_size")
    add("--litserve-timeout-ms", type=float, default=5.0, help="LitServe batch_timeout")
    add("--private-env", action="append", default=[], help="KEY=VALUE for the private tier")
    add("--public-env", action="append", default=[], help="KEY=VALUE for the public tier")
    add("--profile", choices=("auto", "always", "never"), default="auto",
        help="py-spy splitvault at c=32: auto = when a target is missed")  # fmt: skip
    add("--profile-model", type=_csv(str), default=["minilm"], help="models to profile")
    add("--out", type=Path, default=None, help="markdown file (BENCHMARKS.md)")
    add("--plots", type=Path, default=None, help="plot folder (docs/benchmarks)")
    add("--no-write", action="store_true", help="print only")
    add("--base-tree", type=Path, default=None,
        help="splitvault-base's source tree (e.g. git archive of the commit before a change)")  # fmt: skip
    args = parser.parse_args(argv)
    _resolve(args, parser)
    return args


def _resolve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    quick = args.quick
    results = REPO_ROOT / "bench" / "results"
    defaults = {
        "duration": 2.0 if quick else 8.0,
        "rounds": 1 if quick else 2,
        "warmup": 1.0 if quick else 3.0,
        "raw_seconds": 1.0 if quick else 3.0,
        "out": results / "BENCHMARKS.quick.md" if quick else REPO_ROOT / "BENCHMARKS.md",
        "plots": results / "plots" if quick else REPO_ROOT / "docs" / "benchmarks",
    }
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.private_threads is None:
        args.private_threads = max(1, args.threads - args.threads // 2)
    if args.public_threads is None:
        args.public_threads = max(1, args.threads // 2)
    unknown = set(args.models) - set(ALL_MODELS) | set(args.systems) - set(ALL_SYSTEMS)
    unknown |= set(args.profile_model) - set(ALL_MODELS)
    if unknown:
        parser.error(f"unknown model or system: {', '.join(sorted(unknown))}")
    if "splitvault-base" in args.systems and args.base_tree is None:
        parser.error("splitvault-base needs --base-tree")
    numbers = [args.batch, args.threads, args.private_threads, args.public_threads, args.seq]
    numbers.append(args.rounds)
    if min(numbers + args.concurrency + args.raw_batches) < 1 or args.duration <= 0:
        parser.error("counts, sizes and durations must be positive")
    try:
        args.private_env = environment_pairs(args.private_env)
        args.public_env = environment_pairs(args.public_env)
    except ValueError as error:
        parser.error(str(error))


def prepare(workdir: Path, models: Sequence[str]) -> Prepared:
    """A throwaway deployment with the models packed (FP16 transport, 8-decimal policies)."""
    layout = init_deployment(workdir / "deploy")
    provider = LocalFileKeyProvider.load(layout.kek)
    common: dict[str, Any] = {"layout": layout, "provider": provider, "show_progress": False}
    data = digits.load_data()
    model = digits.train(data)
    state = workdir / "digits.pt"
    torch.save(model.state_dict(), state)
    specs = {"digits": digits.spec_for(model, data)}
    if "digits" in models:
        policy = TopKPolicy(k=3, decimals=DECIMALS)
        pack_spec(specs["digits"], name="digits", split=digits.SPLIT, policy=policy, **common)
    if "minilm" in models:
        from splitvault.demo import minilm

        specs["minilm"] = minilm.factory()
        policy_m = RoundingPolicy(decimals=DECIMALS)
        pack_spec(specs["minilm"], name="minilm", split=minilm.SPLIT, policy=policy_m, **common)
    return Prepared(layout, data, specs, state, tuple(m for m in ALL_MODELS if m in models))


def create_key(layout: DeployLayout) -> str:
    """A fresh API key for the benchmark (terms are accepted over HTTP when serving)."""
    from public_api.keys import KEYS_DB, STATE_DIR, SqliteKeyStore

    store = SqliteKeyStore(layout.public.root / STATE_DIR / KEYS_DB)
    try:
        return store.create("serving-benchmark")[1]
    finally:
        store.close()


def v2_body(tensors: dict[str, np.ndarray[Any, Any]]) -> bytes:
    """A v2 inference request body carrying ``tensors`` as flat JSON data."""
    datatypes = {np.dtype(np.float32): "FP32", np.dtype(np.int64): "INT64"}
    inputs = [
        {
            "name": name,
            "shape": list(array.shape),
            "datatype": datatypes[array.dtype],
            "data": array.ravel().tolist(),
        }
        for name, array in tensors.items()
    ]
    return json.dumps({"inputs": inputs}, separators=(",", ":")).encode()


def digits_workload(prepared: Prepared, batch: int) -> Workload:
    """16 different bodies of ``batch`` test images each."""
    images = prepared.digits_data.test_x
    bodies = [v2_body({"image": images[i * batch : (i + 1) * batch]}) for i in range(16)]

    def make_batch(size: int) -> dict[str, torch.Tensor]:
        return {"image": torch.from_numpy(np.resize(images, (size, *images.shape[1:])))}

    module = prepared.specs["digits"].module
    return Workload("digits", "/v2/models/digits/infer", bodies, batch, module, make_batch)


def minilm_workload(prepared: Prepared, batch: int, seq: int) -> Workload:
    """The demo sentences, ``batch`` per body, padded to ``seq`` tokens."""
    from splitvault.demo import minilm

    sentences = minilm.SENTENCES
    bodies = []
    for index in range(len(sentences)):
        chosen = [sentences[(index + k) % len(sentences)] for k in range(batch)]
        tokens = minilm.tokenize(chosen, length=seq)
        bodies.append(v2_body({name: tensor.numpy() for name, tensor in tokens.items()}))

    def make_batch(size: int) -> dict[str, torch.Tensor]:
        chosen = [sentences[k % len(sentences)] for k in range(size)]
        return minilm.tokenize(chosen, length=seq)

    module = prepared.specs["minilm"].module
    return Workload("minilm", "/v2/models/minilm/infer", bodies, batch, module, make_batch)


def measure_raw(
    workload: Workload, thread_counts: Sequence[int], batches: Sequence[int], seconds: float
) -> RawCeiling:
    """The unsplit forward in-process: samples/s at each thread count and batch size."""
    runs: dict[tuple[int, int], float] = {}
    with torch.inference_mode():
        for threads in thread_counts:
            torch.set_num_threads(threads)
            for size in batches:
                runs[(threads, size)] = _forward_rate(workload, size, seconds)
    return RawCeiling(workload.model, runs)


def _forward_rate(workload: Workload, size: int, seconds: float) -> float:
    inputs = workload.make_batch(size)
    workload.module(**inputs)  # warm-up
    calls, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds or calls < 1:
        workload.module(**inputs)
        calls += 1
    return size * calls / elapsed


def load_spec(endpoint: Endpoint, workload: Workload, c: int, args: argparse.Namespace) -> LoadSpec:
    """The load point for one system, model and concurrency."""
    return LoadSpec(
        url=endpoint.base_url + workload.path,
        bodies=workload.bodies,
        concurrency=c,
        duration_s=args.duration,
        warmup_s=args.warmup,
        headers=endpoint.headers,
        verify=endpoint.verify,
    )


def measure_point(
    system: str, endpoint: Endpoint, workload: Workload, c: int, args: argparse.Namespace
) -> Point:
    """Run one load point, with the CPU the server and the load generator spent on it."""
    server_before, client_before = tree_cpu_seconds(endpoint.pids), time.process_time()
    result = asyncio.run(run_load(load_spec(endpoint, workload, c, args)))
    server_cpu = tree_cpu_seconds(endpoint.pids) - server_before
    client_cpu = time.process_time() - client_before
    answered = max(result.answered, 1)
    point = Point(
        system=system,
        model=workload.model,
        concurrency=c,
        samples_per_request=workload.samples,
        throughput_rps=result.throughput,
        p50_ms=result.percentile(50),
        p99_ms=result.percentile(99),
        errors=result.errors,
        server_cpu_ms=server_cpu * 1000 / answered,
        client_cpu_ms=client_cpu * 1000 / answered,
    )
    _progress(
        f"  {system:16} {workload.model:7} c={c:<3} {point.throughput_rps:8.1f} req/s  "
        f"p50 {point.p50_ms:8.2f} ms  p99 {point.p99_ms:8.2f} ms  errors {point.error_count}"
    )
    return point


def accept_terms(endpoint: Endpoint) -> None:
    """Accept the current terms of service with the benchmark key, as a client would."""
    with httpx.Client(base_url=endpoint.base_url, verify=endpoint.verify) as client:
        client.headers.update(endpoint.headers)
        version = client.get("/v1/terms").raise_for_status().json()["version"]
        client.post("/v1/terms/accept", json={"version": version}).raise_for_status()


def check_fidelity(endpoint: Endpoint, prepared: Prepared, seq: int) -> list[Fidelity]:
    """splitvault's answers against the unsplit model in-process."""
    found = []
    with httpx.Client(base_url=endpoint.base_url, verify=endpoint.verify, timeout=60) as client:
        client.headers.update(endpoint.headers)
        if "digits" in prepared.packed:
            found.append(_digits_fidelity(client, prepared))
        if "minilm" in prepared.packed:
            found.append(_minilm_fidelity(client, prepared, seq))
    return found


def _post(client: httpx.Client, model: str, body: bytes) -> dict[str, Any]:
    response = client.post(
        f"/v2/models/{model}/infer", content=body, headers={"Content-Type": "application/json"}
    )
    output: dict[str, Any] = response.raise_for_status().json()["outputs"][0]
    return output


def _digits_fidelity(client: httpx.Client, prepared: Prepared) -> Fidelity:
    images = prepared.digits_data.test_x[:FIDELITY_IMAGES]
    with torch.inference_mode():
        logits = prepared.specs["digits"].module(torch.from_numpy(images)).double()
    expected, expected_top = torch.topk(torch.softmax(logits, dim=-1), 3, dim=-1)
    scores, top = [], []
    for start in range(0, len(images), FIDELITY_CHUNK):
        chunk = images[start : start + FIDELITY_CHUNK]
        output = _post(client, "digits", v2_body({"image": chunk}))
        fields = [item.split(":") for item in output["data"]]
        scores += [float(f[0]) for f in fields]
        top += [int(f[1]) for f in fields]
    got = np.asarray(scores).reshape(-1, 3)
    agree = int((np.asarray(top).reshape(-1, 3)[:, 0] == expected_top[:, 0].numpy()).sum())
    diff = float(np.abs(got - expected.numpy()).max())
    return Fidelity("digits", "top-3 probabilities", diff, f"top-1 agrees {agree}/{len(images)}")


def _minilm_fidelity(client: httpx.Client, prepared: Prepared, seq: int) -> Fidelity:
    from splitvault.demo import minilm

    tokens = minilm.tokenize(minilm.SENTENCES, length=seq)
    with torch.inference_mode():
        expected = prepared.specs["minilm"].module(**tokens).numpy()
    output = _post(client, "minilm", v2_body({k: v.numpy() for k, v in tokens.items()}))
    got = np.asarray(output["data"], dtype=np.float64).reshape(expected.shape)
    diff = float(np.abs(got - expected).max())
    norms = np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1)
    cosine = float(((got * expected).sum(axis=1) / norms).min())
    detail = f"{len(expected)} sentences x {expected.shape[1]} dims; min cosine {cosine:.6f}"
    return Fidelity("minilm", "sentence embeddings", diff, detail)


def server_config(prepared: Prepared, workdir: Path, args: argparse.Namespace) -> ServerConfig:
    """What every system is started with."""
    return ServerConfig(
        layout=prepared.layout,
        workdir=workdir,
        models=prepared.packed,
        digits_state=prepared.digits_state,
        threads=args.threads,
        private_threads=args.private_threads,
        public_threads=args.public_threads,
        litserve_batch=args.litserve_batch,
        litserve_timeout_s=args.litserve_timeout_ms / 1000,
        api_key=create_key(prepared.layout),
        private_env=args.private_env,
        public_env=args.public_env,
        base_tree=args.base_tree,
    )


def start_systems(
    config: ServerConfig, prepared: Prepared, args: argparse.Namespace, stack: ExitStack
) -> tuple[dict[str, Endpoint], list[Fidelity]]:
    """Start every system at once (each stops when ``stack`` closes); terms, FP16 fidelity.

    splitvault-fixed and splitvault-unbatched get copies of the deployment made before any
    tier starts: two tiers sharing one state folder (SQLite, ledger) would wait on each other's
    locks, and a tier stopped while the other is measured would hold them.
    """
    endpoints: dict[str, Endpoint] = {}
    fidelity: list[Fidelity] = []
    configs = {system: config for system in args.systems}
    for variant in set(configs) & set(VARIANTS):
        copy = shutil.copytree(config.layout.root, config.workdir / variant, symlinks=True)
        configs[variant] = dataclasses.replace(config, layout=DeployLayout(copy))
    for system in args.systems:
        _progress(f"starting {system}")
        endpoints[system] = stack.enter_context(running(system, configs[system]))
        if system == "splitvault":
            accept_terms(endpoints[system])
            fidelity = check_fidelity(endpoints[system], prepared, args.seq)
        elif system in VARIANTS:
            accept_terms(endpoints[system])
    return endpoints, fidelity


def idle_cpu_shares(endpoints: dict[str, Endpoint], seconds: float = 3.0) -> dict[str, float]:
    """CPU share (1.0 = one core) each started system uses while none is loaded."""
    before = {name: tree_cpu_seconds(endpoint.pids) for name, endpoint in endpoints.items()}
    time.sleep(seconds)
    return {
        name: (tree_cpu_seconds(endpoint.pids) - before[name]) / seconds
        for name, endpoint in endpoints.items()
    }


def split_measurer(
    prepared: Prepared, model: str, counts: Sequence[int], seq: int
) -> Callable[[], float]:
    """A measurement of one request's front then back stage in-process: median ms at the best
    torch thread count of ``counts``, logged; the stages are loaded once, here."""
    provider = LocalFileKeyProvider.load(prepared.layout.kek)
    front, back = split_compute.load_stages(prepared.layout, provider, model)
    if model == "digits":
        inputs = {"image": prepared.digits_data.test_x[:1]}
    else:
        from splitvault.demo import minilm

        tokens = minilm.tokenize(minilm.SENTENCES[:1], length=seq)
        inputs = {name: tensor.numpy() for name, tensor in tokens.items()}

    def measure() -> float:
        found = split_compute.split_ms(front, back, inputs, counts)
        _progress(
            f"  {model} split compute: "
            + ", ".join(f"{t} thr {ms:.2f} ms" for t, ms in found.items())
        )
        return min(found.values())

    return measure


def measure_rounds(
    endpoints: dict[str, Endpoint],
    workloads: list[Workload],
    args: argparse.Namespace,
    split: Mapping[str, Callable[[], float]],
) -> tuple[dict[tuple[str, str, int], list[Point]], dict[str, list[float]]]:
    """Every point ``args.rounds`` times, the systems interleaved (their order rotating each
    round), so that a slow spell of a shared host falls on all of them: each point's rounds, in
    system, model and concurrency order (reported as medians and per-round ratios). ``split``:
    per model, the in-process split compute, measured in every round after that model's points
    with every system stopped, so that each round's latency is set against its own moment."""
    systems_order = list(endpoints)
    everyone = [pid for endpoint in endpoints.values() for pid in endpoint.pids]
    split_rounds: dict[str, list[float]] = {}
    runs: dict[tuple[str, str, int], list[Point]] = {}
    for round_index in range(args.rounds):
        _progress(f"round {round_index + 1} of {args.rounds}")
        shift = round_index % len(systems_order)
        order = systems_order[shift:] + systems_order[:shift]
        for workload in workloads:
            for c in args.concurrency:
                for system in order:
                    with suspended(_other_pids(endpoints, system)):
                        point = measure_point(system, endpoints[system], workload, c, args)
                    runs.setdefault((system, workload.model, c), []).append(point)
            if workload.model in split:
                with suspended(everyone):
                    split_rounds.setdefault(workload.model, []).append(split[workload.model]())
    ordered = {
        (system, workload.model, c): runs[(system, workload.model, c)]
        for system in systems_order
        for workload in workloads
        for c in args.concurrency
    }
    return ordered, split_rounds


def _other_pids(endpoints: dict[str, Endpoint], system: str) -> list[int]:
    return [pid for name, endpoint in endpoints.items() if name != system for pid in endpoint.pids]


def median_point(rounds: list[Point]) -> Point:
    """One point from several rounds: the median of each figure, the errors of all rounds."""
    errors: dict[str, int] = {}
    for point in rounds:
        for name, count in point.errors.items():
            errors[name] = errors.get(name, 0) + count

    def median(values: list[float]) -> float:
        return float(np.median(values))

    return dataclasses.replace(
        rounds[0],
        throughput_rps=median([p.throughput_rps for p in rounds]),
        p50_ms=median([p.p50_ms for p in rounds]),
        p99_ms=median([p.p99_ms for p in rounds]),
        errors=errors,
        server_cpu_ms=median([p.server_cpu_ms for p in rounds]),
        client_cpu_ms=median([p.client_cpu_ms for p in rounds]),
    )


def profile_splitvault(
    endpoint: Endpoint,
    others: list[int],
    workload: Workload,
    folder: Path,
    args: argparse.Namespace,
) -> list[str]:
    """py-spy both tiers while splitvault (protected) serves ``workload`` at c=32."""
    c = 32
    _progress(f"profiling splitvault with py-spy: {workload.model} c={c}")
    spec = load_spec(endpoint, workload, c, args)
    processes = {"public tier": endpoint.pids[0], "private tier": endpoint.pids[1]}
    with suspended(others):
        result, profiles = asyncio.run(serving_profile.profile_load(spec, processes, folder))
        breakdown = phase_breakdown_section(
            endpoint, workload, dataclasses.replace(spec, warmup_s=0)
        )
    return [
        *breakdown,
        f"## Profile: splitvault (protected), {workload.model}, c={c}",
        "",
        "py-spy at 100 Hz (non-blocking, `--gil`: only the thread holding the GIL is sampled, "
        "so shares are of Python CPU time, not of waiting; torch kernels show as the op that "
        f"called them) on each tier for {args.duration:g} s after {args.warmup:g} s of warm-up; {result.throughput:.1f} req/s, "
        f"p50 {result.percentile(50):.1f} ms while profiled. 'inclusive': share of samples "
        "with the frame on the stack; 'self': share with the frame on top. CPU per request "
        "is approximate (the CPU window includes the drain).",
        "",
        *serving_profile.summarise(profiles, result.completed),
        "Per hop (each sample counted for the innermost frame that names a hop; GIL-holding "
        "samples, so torch kernels and C-level TLS count only while they hold the GIL):",
        "",
        *serving_profile.hop_table(profiles, result.completed),
    ]


def phase_breakdown_section(endpoint: Endpoint, workload: Workload, spec: LoadSpec) -> list[str]:
    """Each phase's p50 and p99 from the tiers' histograms over one more c=32 window."""
    before = phase_breakdown.scrape(endpoint.metrics_urls, workload.model)
    result = asyncio.run(run_load(spec))
    after = phase_breakdown.scrape(endpoint.metrics_urls, workload.model)
    return [
        f"## Where c={spec.concurrency} requests wait: splitvault (protected), {workload.model}",
        "",
        f"The tiers' own latency histograms over {spec.duration_s:g} s at c={spec.concurrency} "
        f"(client: {result.throughput:.1f} req/s, p50 {result.percentile(50):.1f} ms, p99 "
        f"{result.percentile(99):.1f} ms). Percentiles are interpolated within buckets "
        "(1, 2.5, 5, 10, 25, 50, 100, 250, 500 ms, 1 s, 2.5 s ...), so each is only as fine as "
        "its bucket. Phases overlap: the private round trip contains the queue wait and the batch.",
        "",
        *phase_breakdown.table(before, after),
        "",
    ]


def conditions(args: argparse.Namespace, workloads: list[Workload]) -> list[str]:
    """The conditions the figures were taken under."""
    import litserve

    sizes = ", ".join(f"{w.model} {len(w.bodies[0]):,} bytes" for w in workloads)
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    return [
        f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC; {os.cpu_count()} CPUs "
        f"({platform.processor() or platform.machine()}), load average at start {load}; "
        f"Python {platform.python_version()}, torch {torch.__version__}, "
        f"LitServe {litserve.__version__}",
        f"torch thread budget per system: {args.threads} (splitvault: private "
        f"{args.private_threads} + public {args.public_threads})",
        f"each point: {args.warmup:g} s warm-up, then {args.duration:g} s measured, "
        f"{args.rounds} round(s) with the systems interleaved, the median reported; closed-loop "
        f"clients (bench/loadgen.py, httpx HTTP/1.1 keep-alive, one connection per client) on "
        f"the same host, sharing its CPUs",
        f"{args.batch} sample(s) per request, MiniLM padded to {args.seq} tokens; JSON body "
        f"{sizes}; every server behind HTTPS with the same certificate, verified by the client",
        f"raw ceiling: best of 1 and {args.threads} torch threads, {args.raw_seconds:g} s per "
        f"batch size; splitvault extra environment: "
        f"private {mapping_note(args.private_env)}; public {mapping_note(args.public_env)}",
    ]


def run(args: argparse.Namespace) -> Report:
    """Pack, measure the raw ceilings, start every system, measure in rounds; undone on exit."""
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sv-serving-")))
        _progress("training digits and packing the models")
        prepared = prepare(workdir, args.models)
        workloads = []
        if "digits" in args.models:
            workloads.append(digits_workload(prepared, args.batch))
        if "minilm" in args.models:
            workloads.append(minilm_workload(prepared, args.batch, args.seq))
        _progress("raw model ceilings")
        counts = sorted({1, args.threads})  # one thread can win on a busy host
        raw = {
            w.model: measure_raw(w, counts, args.raw_batches, args.raw_seconds) for w in workloads
        }
        split = {model: split_measurer(prepared, model, counts, args.seq) for model in args.models}
        config = server_config(prepared, workdir, args)
        endpoints, fidelity = start_systems(config, prepared, args, stack)
        idle = idle_cpu_shares(endpoints)
        rounds, split_ms = measure_rounds(endpoints, workloads, args, split)
        points = [median_point(found) for found in rounds.values()]
        known = systems(config)
        report = Report(
            conditions=[*conditions(args, workloads), _idle_note(idle)],
            systems={s: (known[s].label, known[s].note) for s in args.systems},
            points=points,
            raw=raw,
            fidelity=fidelity,
            command=_command(),
            rounds=rounds,
            split_ms=split_ms,
        )
        if _should_profile(report, args):
            folder = REPO_ROOT / "bench" / "results" / "profiles"  # ignored by git
            report.profile = []
            for profiled in (w for w in workloads if w.model in args.profile_model):
                report.profile += profile_splitvault(
                    endpoints["splitvault"],
                    _other_pids(endpoints, "splitvault"),
                    profiled,
                    folder / profiled.model,
                    args,
                )
        return report


def _idle_note(shares: dict[str, float]) -> str:
    each = ", ".join(f"{name} {share * 100:.1f} %" for name, share in shares.items())
    return (
        "all systems run at once, each loaded in turn while the others are stopped (SIGSTOP: "
        f"idle, they still used CPU, 100 % = one core: {each})"
    )


def _should_profile(report: Report, args: argparse.Namespace) -> bool:
    from bench.serving_report import evaluate_targets

    if (
        args.profile == "never"
        or not set(args.profile_model) & set(args.models)
        or "splitvault" not in args.systems
    ):
        return False
    if serving_profile.py_spy() is None:
        _progress("py-spy not installed: no profile")
        return False
    missed = any(
        result.met is False for result in evaluate_targets(report) if result.system == "splitvault"
    )
    return args.profile == "always" or missed


def _command() -> str:
    return shlex.join([".venv/bin/python", "bench/serving_comparison.py", *sys.argv[1:]])


def _progress(step: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {step}", file=sys.stderr, flush=True)


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """Run the comparison, print it, write BENCHMARKS.md and the plots."""
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    signal.signal(signal.SIGTERM, _raise_interrupt)  # clean up on SIGTERM as on Ctrl-C
    try:
        report = run(args)
    except KeyboardInterrupt:
        print("interrupted; servers stopped and temporary folder removed", file=sys.stderr)
        return 130
    if not args.no_write:
        report.plots = plot(report, args.plots, prefix="quick_" if args.quick else "")
        args.out.parent.mkdir(parents=True, exist_ok=True)
    text = render(report, args.out)
    print(text)
    if not args.no_write:
        write_section(args.out, text)
        _progress(f"wrote {args.out} and {len(report.plots)} plots in {args.plots}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
