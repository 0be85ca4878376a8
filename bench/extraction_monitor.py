"""How fast the extraction monitor catches attackers, and whether it spares benign users.

Attackers from ``bench/attacks.py`` (a JbDA synthetic attacker, a random-perturbation attacker
and a natural-data attacker, each with its own API key) run beside simulated benign clients
(natural test digits, varied volume, focus, repeats and pace over two weeks). For each attacker
it prints the queries answered until its key was flagged and blocked, and the agreement with
the model of a copy trained on what it had when it was blocked; then how many benign clients
were flagged.

* ``--mode inprocess`` (default): the digits model is packed into a temporary deployment; its
  front stage gives the activations, the unsplit model gives top-3 answers, and an
  ``ExtractionMonitor`` with a simulated clock judges every request. About a minute.
* ``--mode api``: through the public API of a two-tier deployment with the SDK, one API key
  per client (created in DIR/public/state/keys.sqlite3 with high limits, so the rate limiter
  does not hide the monitor) with the terms accepted. ``--start`` packs the model into a
  temporary deployment and starts both tiers (the per-address limit raised: every simulated
  client shares one address); ``--deploy DIR --url URL`` uses a running deployment serving
  ``digits``. Flags are read from DIR/public/state/monitor.sqlite3, blocks are the 403s. The
  server keeps real time, so the benign pacing is compressed to "as fast as possible", and
  benign scores are those the assessment log last recorded.

Run from the repository root:  .venv/bin/python bench/extraction_monitor.py
                               .venv/bin/python bench/extraction_monitor.py --mode api --start
"""

# ruff: noqa: E402 - the repository root goes on sys.path before the project imports.
from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
for path in (REPO_ROOT, REPO_ROOT / "sdk"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import argparse
import asyncio
import heapq
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from bench.attacks import (
    Answer,
    Attacker,
    Batch,
    BenignClient,
    Images,
    JacobianAttacker,
    Labels,
    NaturalAttacker,
    Pacing,
    PerturbationAttacker,
    benign_clients,
)
from public_api.monitor import (
    ExtractionMonitor,
    MemoryMonitorStore,
    MonitorConfig,
    ReferenceProfile,
    load_profile,
    read_assessments,
)
from shared.keys import LocalFileKeyProvider
from shared.layout import DeployLayout
from shared.logs import configure_logging
from shared.manifest import StageManifest, TopKPolicy, read_manifest
from splitvault.demo import digits
from splitvault.deploy import init_deployment
from splitvault.launcher import start_both
from splitvault.packing.pack import pack_spec

MODEL = "digits"
TOP_K = 3
DAY = 86400.0
REFERENCE_FILE = "reference.npz"
TRACE_MARKS = (250, 500, 1000, 1500, 2000, 2500, 3000)


class Client(Protocol):
    """A simulated client (see bench/attacks.py)."""

    name: str
    kind: str

    def next_batch(self) -> Batch | None: ...

    def receive(self, batch: Batch, answer: Answer) -> None: ...


@dataclass
class Verdict:
    """What happened to one client's key."""

    queries: int = 0
    flagged_at: int | None = None
    blocked_at: int | None = None
    level: str = "ok"
    score: float = 0.0
    max_score: float = 0.0
    reasons: tuple[str, ...] = ()
    fidelity: float | None = None
    trace: list[str] = field(default_factory=list)


class Backend(Protocol):
    """Answers a client's batch and says what the monitor now thinks of its key."""

    async def serve(
        self, client: Client, batch: Batch
    ) -> tuple[Answer | None, str, float, tuple[str, ...]]: ...

    def labels(self, images: Images) -> Labels: ...


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--mode", choices=["inprocess", "api"], default="inprocess")
    parser.add_argument("--benign", type=int, default=120, help="simulated benign clients")
    parser.add_argument("--budget", type=int, default=3000, help="queries per attacker at most")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--start", action="store_true", help="api mode: start a deployment")
    parser.add_argument("--deploy", type=Path, help="api mode: the running deployment's folder")
    parser.add_argument("--url", help="api mode: the public tier's URL")
    parser.add_argument("--no-fidelity", action="store_true", help="skip training the copies")
    parser.add_argument(
        "--trace", action="store_true", help="also print attackers' reasons at fixed counts"
    )
    return parser.parse_args(argv)


class Model:
    """The digits data, the unsplit network, and the packed front stage with its profile."""

    def __init__(self, deploy: DeployLayout, data: digits.DigitsData, net: torch.nn.Module):
        self.data, self.net = data, net
        folder = deploy.public.model(MODEL)
        self.manifest: StageManifest = read_manifest(folder)
        self.front = torch.export.load(folder / self.manifest.file).module()
        self.profile: ReferenceProfile = load_profile(folder / REFERENCE_FILE)

    def activations(self, images: Images) -> dict[str, np.ndarray]:
        """Front-stage outputs as the public tier sends them (FP16)."""
        with torch.inference_mode():
            out = self.front(torch.from_numpy(images))
        tensor = out[0] if isinstance(out, tuple | list) else out
        return {self.manifest.outputs[0].name: tensor.numpy().astype(np.float16)}

    def answer(self, images: Images) -> Answer:
        """Top-3 classes with probabilities rounded to 4 decimals, like the packed policy."""
        with torch.inference_mode():
            probabilities = torch.softmax(self.net(torch.from_numpy(images)), dim=1)
        scores, indices = probabilities.topk(TOP_K, dim=1)
        return Answer(
            indices[:, 0].numpy(), indices.numpy(), np.round(scores.numpy(), 4).astype(np.float32)
        )


class InProcess:
    """The model in this process and a monitor on a simulated clock."""

    def __init__(self, model: Model, config: MonitorConfig) -> None:
        self.model, self.now = model, 0.0
        self.observe_ms: list[float] = []
        self.monitor = ExtractionMonitor(
            config, {MODEL: model.profile}, MemoryMonitorStore(), clock=lambda: self.now
        )

    async def serve(
        self, client: Client, batch: Batch
    ) -> tuple[Answer | None, str, float, tuple[str, ...]]:
        current = await self.monitor.current(client.name)
        if current.level == "blocked":
            return None, current.level, current.score, current.reasons
        self.now = batch.at
        answer = self.model.answer(batch.images)
        activations = self.model.activations(batch.images)
        started = time.perf_counter()
        assessment = await self.monitor.observe(
            client.name,
            MODEL,
            {"image": batch.images},
            activations,
            answer.indices,
            self.model.manifest.outputs,
        )
        self.observe_ms.append((time.perf_counter() - started) * 1000)
        return answer, assessment.level, assessment.score, assessment.reasons

    def labels(self, images: Images) -> Labels:
        """The model's top-1 classes."""
        return self.model.answer(images).labels


class ThroughApi:
    """A running deployment: one API key and SDK client per simulated client."""

    def __init__(self, deploy: DeployLayout, url: str, run: str) -> None:
        from public_api.keys import SqliteKeyStore

        self.deploy, self.url, self.run = deploy, url, run
        self.keys = SqliteKeyStore(deploy.public.root / "state" / "keys.sqlite3")
        self.log = deploy.public.root / "state" / "monitor.sqlite3"
        self.clients: dict[str, tuple[Any, str]] = {}

    def _client(self, name: str) -> tuple[Any, str]:
        from splitvault_client import Client as SdkClient

        if name not in self.clients:
            key, secret = self.keys.create(
                f"bench-{self.run}-{name}", rate_per_s=1000.0, burst=2000, daily_quota=10**7
            )
            sdk = SdkClient(self.url, api_key=secret, ca=self.deploy.public.ca_cert, timeout=60)
            sdk.accept_terms(sdk.terms().version)
            self.clients[name] = (sdk, key.key_id)
        return self.clients[name]

    async def serve(
        self, client: Client, batch: Batch
    ) -> tuple[Answer | None, str, float, tuple[str, ...]]:
        from splitvault_client import Forbidden, RateLimited

        sdk, key_id = self._client(client.name)
        while True:
            try:
                prediction = sdk.predict(MODEL, batch.images, top_k=TOP_K)
                break
            except RateLimited as error:  # the per-address limit: all clients share one address
                await asyncio.sleep(error.retry_after or 1.0)
            except Forbidden:
                return None, "blocked", *self._latest(key_id)[1:]
        indices = prediction.indices
        answer = Answer(indices[:, 0], indices, prediction.scores)
        return (answer, *self._latest(key_id))

    def labels(self, images: Images) -> Labels:
        """The served model's top-1 classes, asked with a key of their own."""
        sdk, _ = self._client("evaluator")
        chunks = [sdk.predict(MODEL, images[i : i + 50]).indices for i in range(0, len(images), 50)]
        return np.concatenate(chunks)[:, 0]

    def _latest(self, key_id: str) -> tuple[str, float, tuple[str, ...]]:
        found = read_assessments(self.log, key_id)
        if not found:
            return "ok", 0.0, ()
        return found[0].level, found[0].score, found[0].reasons


async def simulate(backend: Backend, clients: Sequence[Client], trace: bool) -> dict[str, Verdict]:
    """Run every client in time order until each is done or blocked."""
    verdicts = {client.name: Verdict() for client in clients}
    queue: list[tuple[float, int, Client, Batch]] = []
    for order, client in enumerate(clients):
        batch = client.next_batch()
        if batch is not None:
            heapq.heappush(queue, (batch.at, order, client, batch))
    while queue:
        _, order, client, batch = heapq.heappop(queue)
        verdict = verdicts[client.name]
        answer, level, score, reasons = await backend.serve(client, batch)
        if answer is not None:
            client.receive(batch, answer)
            verdict.queries += len(batch.images)
        _note(verdict, client.kind == "attacker", len(batch.images), (level, score, reasons), trace)
        if level == "blocked":
            verdict.blocked_at = verdict.queries
            continue
        following = client.next_batch()
        if following is not None:
            heapq.heappush(queue, (following.at, order, client, following))
    return verdicts


def _note(
    verdict: Verdict,
    attacker: bool,
    sent: int,
    seen: tuple[str, float, tuple[str, ...]],
    trace: bool,
) -> None:
    """Keep the monitor's latest word; an attacker's reasons when first flagged and blocked."""
    level, score, reasons = seen
    verdict.level, verdict.score, verdict.reasons = level, score, reasons
    verdict.max_score = max(verdict.max_score, score)
    first_flag = level != "ok" and verdict.flagged_at is None
    if first_flag:
        verdict.flagged_at = verdict.queries
    passed_mark = any(verdict.queries - sent < mark <= verdict.queries for mark in TRACE_MARKS)
    if attacker and (first_flag or level == "blocked" or (trace and passed_mark)):
        verdict.trace.append(f"{verdict.queries:>5} {score:.2f} {level}: {'; '.join(reasons)}")


def make_clients(
    model: Model, args: argparse.Namespace
) -> tuple[list[Attacker], list[BenignClient]]:
    """Three attackers starting on days 3, 5 and 7, and the benign population."""
    data, rng = model.data, np.random.default_rng(args.seed)
    seeds = data.test_x[rng.choice(len(data.test_x), 10, replace=False)]
    attackers: list[Attacker] = [
        JacobianAttacker(seeds, Pacing(args.budget, 20, 2.0, 3 * DAY, args.seed + 1)),
        PerturbationAttacker(seeds, Pacing(args.budget, 20, 2.0, 5 * DAY, args.seed + 2)),
        NaturalAttacker(data.test_x, Pacing(args.budget, 20, 2.0, 7 * DAY, args.seed + 3)),
    ]
    benign = benign_clients(args.benign, data.test_x, data.test_y, seed=args.seed + 4)
    return attackers, benign


def report(
    attackers: Sequence[Attacker],
    benign: Sequence[BenignClient],
    verdicts: dict[str, Verdict],
    backend: Backend,
    eval_x: Images,
    fidelity: bool,
) -> None:
    """Print the attacker table and the benign summary."""
    eval_y = backend.labels(eval_x) if fidelity else np.zeros(0, np.int64)
    print(f"{'attacker':<32} {'flagged at':>10} {'blocked at':>10} {'copy fidelity':>14}")
    for attacker in attackers:
        v = verdicts[attacker.name]
        fid = "-"
        if fidelity and v.queries:
            fid = f"{attacker.copy_fidelity(eval_y, eval_x):.1%} @ {v.queries}"
        print(f"{attacker.name:<32} {_at(v.flagged_at):>10} {_at(v.blocked_at):>10} {fid:>14}")
        for line in v.trace:
            print(f"    {line}")
    flagged = [c for c in benign if verdicts[c.name].flagged_at is not None]
    volumes = [verdicts[c.name].queries for c in benign]
    scores = np.array([verdicts[c.name].max_score for c in benign])
    print(
        f"benign clients: {len(flagged)}/{len(benign)} flagged "
        f"({sum(volumes):,} queries, {min(volumes)}-{max(volumes)} each; "
        f"max score {scores.max():.2f}, p95 {np.quantile(scores, 0.95):.2f})"
    )
    for client in sorted(benign, key=lambda c: -verdicts[c.name].max_score)[:3]:
        v = verdicts[client.name]
        print(f"    {client.name} {v.queries:>4} q, max {v.max_score:.2f}: {'; '.join(v.reasons)}")


def _at(queries: int | None) -> str:
    return "never" if queries is None else f"{queries:,}"


def prepare(args: argparse.Namespace, workdir: Path, stack: ExitStack) -> tuple[Model, Backend]:
    """The model, and the in-process monitor or the API of a deployment (started if asked)."""
    data = digits.load_data()
    net = digits.train(data)
    if args.mode == "api" and not args.start:
        if args.deploy is None or args.url is None:
            raise SystemExit("--mode api needs --start, or --deploy DIR and --url URL")
        layout = DeployLayout(args.deploy)
        return Model(layout, data, net), ThroughApi(layout, args.url, f"{int(time.time())}")
    layout = init_deployment(workdir / "deploy")
    pack_spec(
        digits.spec_for(net, data),  # the training images become the reference profile
        name=MODEL,
        split=digits.SPLIT,
        layout=layout,
        provider=LocalFileKeyProvider.load(layout.kek),
        policy=TopKPolicy(k=TOP_K),
        show_progress=False,
    )
    model = Model(layout, data, net)
    if args.mode == "inprocess":
        return model, InProcess(model, MonitorConfig())
    return model, ThroughApi(layout, start_tiers(layout.root, stack), "bench")


def start_tiers(deploy: Path, stack: ExitStack) -> str:
    """Both tiers on free ports, stopped when ``stack`` closes; returns the public URL."""
    env = {
        "SPLITVAULT_PRIVATE_TORCH_THREADS": "1",
        "SPLITVAULT_PUBLIC_TORCH_THREADS": "1",
        "SPLITVAULT_PUBLIC_PROTECTION__IP_LIMITS__RATE_PER_S": "100000",
        "SPLITVAULT_PUBLIC_PROTECTION__IP_LIMITS__BURST": "100000",
    }
    public, _ = start_both(deploy, stack, env=env)
    return f"https://localhost:{public.port}"


def main(argv: Sequence[str] | None = None) -> None:
    """Run the benchmark and print its table."""
    args = parse_args(argv)
    torch.set_num_threads(1)
    configure_logging("WARNING", tier="bench")  # alerts go to stderr as JSON lines
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        model, backend = prepare(args, Path(tmp), stack)
        attackers, benign = make_clients(model, args)
        verdicts = asyncio.run(simulate(backend, [*attackers, *benign], args.trace))
        print(
            f"mode {args.mode}, seed {args.seed}, {len(benign)} benign clients, "
            f"attacker budget {args.budget}"
        )
        # Fidelity is measured on the training split, which no client ever sends.
        report(attackers, benign, verdicts, backend, model.data.train_x, not args.no_fidelity)
        if isinstance(backend, InProcess):
            ms = np.array(backend.observe_ms)
            print(
                f"observe(): {len(ms):,} calls, median {np.median(ms):.2f} ms, "
                f"p99 {np.quantile(ms, 0.99):.2f} ms"
            )
    print(f"({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
