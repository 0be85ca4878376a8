"""What the public tier's state backend costs per request: SQLite vs PostgreSQL, one replica and
three, digits and MiniLM, and the audit record committed before the answer vs only queued
(issue 15), side by side in one run.

digits (trained here) and MiniLM (batch 1, ``--seq`` tokens) are packed into a temporary
deployment; one private tier serves every configuration. For each backend three sets of public
replicas start together: ``commit`` (one replica, ``audit_on_failure = "refuse"``: each answer
waits for its record's group commit), ``queued`` (one replica, ``"buffer"``: the record is only
queued, the writer commits it within 50 ms: the old writer) and ``commit x3`` (three replicas).
``sqlite`` gives each replica its own state folder (a copy of one key store: today's one-host
layout); ``postgres`` puts keys, terms, monitor decisions and one audit chain per replica in a
fresh database of a throwaway PostgreSQL on a Unix socket (the key moved there by ``state
migrate``). Limits are raised out of the way and kept in memory, so only the state differs.

Per model, ``--rounds`` interleaved rounds run each set for ``--seconds`` with ``--concurrency``
closed-loop clients spread evenly over its replicas (one warm-up round first). Reported per
configuration, over all its rounds:

- answers/s (information only) and the clients' p50/p99 (ms);
- the public tier's time outside the front stages and the private call, per request (ms), and
  the mean wait of an answer for its record's commit (``splitvault_audit_commit_seconds``);
- public CPU per request: user + system CPU of the set's replicas (/proc/PID/stat) over its
  rounds, divided by the answers; PostgreSQL's CPU (postmaster and backends) likewise;
- commit vs queued: the median over rounds of the per-round ratio of public CPU per request and
  of p50.

Every process shares this machine's cores: compare the cost per request; three replicas on two
cores add no throughput, and scaling must be measured on more cores. Run from the repository
root (about ten minutes on a busy 2-core host, MiniLM's packing included):
.venv/bin/python bench/state_backends.py
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
import json
import os
import shutil
import ssl
import statistics
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack, closing
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from bench.loadgen import LoadResult, LoadSpec, run_load
from public_api.keys import KEYS_DB, KeyStore, SqliteKeyStore
from public_api.pg_keys import PgKeyStore
from public_api.pg_store import open_pool
from public_api.terms import load_terms
from shared.keys import LocalFileKeyProvider
from shared.layout import DeployLayout
from shared.manifest import RoundingPolicy, TopKPolicy
from splitvault.demo import digits, minilm
from splitvault.deploy import init_deployment
from splitvault.launcher import TierProcess, start_private, start_public
from splitvault.packing.pack import pack_spec
from splitvault.state_migrate import migrate_sqlite
from tests.support.postgres_server import PostgresServer

MODELS = ("digits", "minilm")
BACKENDS = ("sqlite", "postgres")
# Sets of public replicas per backend: name -> (replicas, audit_on_failure).
SETS = {"commit": (1, "refuse"), "queued": (1, "buffer"), "commit x3": (3, "refuse")}
TICKS = os.sysconf("SC_CLK_TCK")
OPEN = {  # limits out of the way and in memory: only the state backend differs
    "SPLITVAULT_PRIVATE_TORCH_THREADS": "1",
    "SPLITVAULT_PUBLIC_TORCH_THREADS": "1",
    "SPLITVAULT_PUBLIC_PROTECTION__KEY_LIMITS__RATE_PER_S": "1000000",
    "SPLITVAULT_PUBLIC_PROTECTION__KEY_LIMITS__BURST": "1000000",
    "SPLITVAULT_PUBLIC_PROTECTION__KEY_LIMITS__DAILY_QUOTA": "100000000",
    "SPLITVAULT_PUBLIC_PROTECTION__IP_LIMITS__RATE_PER_S": "1000000",
    "SPLITVAULT_PUBLIC_PROTECTION__IP_LIMITS__BURST": "1000000",
    "SPLITVAULT_PUBLIC_PROTECTION__MONITOR_ACTION": "record",
    "SPLITVAULT_PUBLIC_PROTECTION__GROUPS_ENABLED": "false",  # every client is 127.0.0.1
    "SPLITVAULT_PRIVATE_ACTIVATION_MONITOR__ACTION": "record",
}
SUMS = (
    "splitvault_request_seconds",
    "splitvault_front_seconds",
    "splitvault_private_call_seconds",
    "splitvault_audit_commit_seconds",
)


@dataclass
class Round:
    """One set's figures over one measured round of one model."""

    result: LoadResult
    public_cpu_s: float
    postgres_cpu_s: float
    sums: dict[str, float]

    @property
    def cpu_ms(self) -> float:
        return self.public_cpu_s / max(self.result.answered, 1) * 1000

    @property
    def p50(self) -> float:
        return self.result.percentile(50)


@dataclass
class Row:
    """One configuration (model, backend, set) over all its rounds."""

    model: str
    backend: str
    name: str
    rounds: list[Round]

    def merged(self) -> LoadResult:
        return LoadResult(
            self.rounds[0].result.concurrency,
            sum(r.result.window_s for r in self.rounds),
            [ms for r in self.rounds for ms in r.result.latencies_ms],
            _merge_errors([r.result for r in self.rounds]),
            sum(r.result.answered for r in self.rounds),
        )

    def total(self, name: str) -> float:
        return sum(r.sums[name] for r in self.rounds)

    def line(self) -> str:
        result = self.merged()
        answered = max(result.answered, 1)
        count = max(self.total("count"), 1.0)
        request, front, call, commit = (self.total(f"{s}_sum") for s in SUMS)
        commits = self.total("commits")
        wait = "-" if not commits else f"{commit / commits * 1000:.2f}"
        pg = sum(r.postgres_cpu_s for r in self.rounds) / answered * 1000
        return (
            f"| {self.model} | {self.backend} | {self.name} | {result.throughput:.0f} | "
            f"{result.percentile(50):.1f} | {result.percentile(99):.1f} | "
            f"{(request - front - call) / count * 1000:.2f} | {wait} | "
            f"{sum(r.public_cpu_s for r in self.rounds) / answered * 1000:.2f} | "
            f"{'-' if self.backend == 'sqlite' else f'{pg:.2f}'} | {result.error_count} |"
        )


def _merge_errors(results: Sequence[LoadResult]) -> dict[str, int]:
    errors: dict[str, int] = {}
    for result in results:
        for kind, count in result.errors.items():
            errors[kind] = errors.get(kind, 0) + count
    return errors


def prepare(workdir: Path) -> tuple[DeployLayout, Path, str]:
    """A deployment with digits and MiniLM, and a state folder holding one key that accepted
    the terms (the template every configuration starts from)."""
    data = digits.load_data()
    layout = init_deployment(workdir / "deploy")
    provider = LocalFileKeyProvider.load(layout.kek)
    pack_spec(
        digits.spec_for(digits.train(data, epochs=4), data),
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
        policy=RoundingPolicy(),
        show_progress=False,
    )
    template = workdir / "template"
    template.mkdir(mode=0o700)
    terms = load_terms(layout.public.root / "terms.md", "1")
    with closing(SqliteKeyStore(template / KEYS_DB)) as store:
        key, secret = store.create("bench")
        store.record_acceptance(key.key_id, terms.version, terms.sha256, "127.0.0.1", 0.0)
    return layout, template, secret


def admission_reads(store: KeyStore, secret: str, calls: int) -> tuple[float, float, float, float]:
    """p50 and p99 (µs) of the store reads of one admission: every request reads the monitor
    decision (never cached); a key-cache miss (every ``key_cache_s``) also authenticates and
    reads the accepted terms. Sequential, in this process: the store's own latency."""
    key_id = store.authenticate(secret).key_id
    decision: list[float] = []
    miss: list[float] = []
    for _ in range(calls):
        started = time.perf_counter()
        store.monitor_decision(key_id)
        decision.append((time.perf_counter() - started) * 1e6)
        started = time.perf_counter()
        store.accepted_version(store.authenticate(secret).key_id)
        miss.append((time.perf_counter() - started) * 1e6)
    q = statistics.quantiles
    return (
        statistics.median(decision),
        q(decision, n=100)[98],
        statistics.median(miss),
        q(miss, n=100)[98],
    )


def _cpu_s(pids: Sequence[int]) -> float:
    """User + system CPU seconds of ``pids`` so far (a process gone counts nothing)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / TICKS


def _postgres_pids(server: PostgresServer | None) -> list[int]:
    """The postmaster and its children (the backends serving the pools)."""
    if server is None or server.process is None:
        return []
    root = server.process.pid
    children = Path(f"/proc/{root}/task/{root}/children").read_text().split()
    return [root, *map(int, children)]


def _sums(replicas: Sequence[TierProcess], model: str) -> dict[str, float]:
    """Sums and counts of the request, front, private-call and commit-wait histograms of
    ``model`` (the commit wait has no model label) over ``replicas``."""
    found = dict.fromkeys([f"{name}_sum" for name in SUMS] + ["count", "commits"], 0.0)
    for replica in replicas:
        text = httpx.get(replica.metrics_url, timeout=10).text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.labels.get("model", model) != model:
                    continue
                if sample.name in found:
                    found[sample.name] += sample.value
                elif sample.name == "splitvault_request_seconds_count":
                    found["count"] += sample.value
                elif sample.name == "splitvault_audit_commit_seconds_count":
                    found["commits"] += sample.value
    return found


def _start(
    layout: DeployLayout, private: TierProcess, env: dict[str, str], names: Sequence[str]
) -> list[TierProcess]:
    started: list[TierProcess] = []
    try:
        for name in names:
            replica_env = {**env, "SPLITVAULT_PUBLIC_REPLICA_NAME": name}
            replica_env["SPLITVAULT_PUBLIC_STATE_DIR"] = env["SPLITVAULT_PUBLIC_STATE_DIR"].format(
                name=name
            )
            started.append(start_public(layout.root, private.port, env=replica_env))
    except BaseException:
        for replica in started:
            replica.stop()
        raise
    return started


async def _load(
    replicas: Sequence[TierProcess],
    ca: str,
    secret: str,
    model: str,
    bodies: Sequence[bytes],
    concurrency: int,
    seconds: float,
) -> LoadResult:
    """``concurrency`` clients spread evenly over ``replicas``; one merged result."""
    context = ssl.create_default_context(cafile=ca)
    n = len(replicas)
    shares = [concurrency // n + (i < concurrency % n) for i in range(n)]
    results = await asyncio.gather(
        *(
            run_load(
                LoadSpec(
                    url=f"https://localhost:{r.port}/v2/models/{model}/infer",
                    bodies=bodies,
                    concurrency=share,
                    duration_s=seconds,
                    warmup_s=0.0,
                    headers={"Authorization": f"Bearer {secret}"},
                    verify=context,
                )
            )
            for r, share in zip(replicas, shares, strict=True)
        )
    )
    latencies = [ms for result in results for ms in result.latencies_ms]
    answered = sum(result.answered for result in results)
    return LoadResult(concurrency, results[0].window_s, latencies, _merge_errors(results), answered)


@dataclass
class Backend:
    """One backend's running replica sets and how to read their costs."""

    name: str
    sets: dict[str, list[TierProcess]]
    postgres: PostgresServer | None
    ca: str
    secret: str
    reads: tuple[float, float, float, float]

    def round(
        self, set_name: str, model: str, bodies: Sequence[bytes], seconds: float, c: int
    ) -> Round:
        replicas = self.sets[set_name]
        pids = [r.process.pid for r in replicas]
        pg = _postgres_pids(self.postgres)
        before, cpu, pg_cpu = _sums(replicas, model), _cpu_s(pids), _cpu_s(pg)
        result = asyncio.run(_load(replicas, self.ca, self.secret, model, bodies, c, seconds))
        cpu, pg_cpu = _cpu_s(pids) - cpu, _cpu_s(pg) - pg_cpu
        after = _sums(replicas, model)
        return Round(result, cpu, pg_cpu, {k: after[k] - before[k] for k in after})

    def stop(self) -> None:
        for replicas in self.sets.values():
            for replica in replicas:
                replica.stop()


def start_backend(
    backend: str,
    setup: tuple[DeployLayout, Path, str, TierProcess, PostgresServer],
    workdir: Path,
    args: argparse.Namespace,
) -> Backend:
    """Every replica set of ``backend``, started, and its store's admission reads timed."""
    layout, template, secret, private, postgres = setup
    env = {**OPEN, "SPLITVAULT_PUBLIC_METRICS_PORT": "0"}
    env["SPLITVAULT_PUBLIC_STATE_DIR"] = str(workdir / f"{backend}-{{name}}")
    names = {
        set_name: [f"{set_name.replace(' ', '')}-{i}" for i in range(n)]
        for set_name, (n, _) in SETS.items()
    }
    if backend == "sqlite":
        for replica_names in names.values():
            for name in replica_names:
                shutil.copytree(template, workdir / f"{backend}-{name}")
        store: KeyStore = SqliteKeyStore(workdir / f"{backend}-commit-0" / KEYS_DB)
    else:
        dsn_file = workdir / f"{backend}.dsn"
        dsn_file.write_text(postgres.create_database("bench") + "\n")
        dsn_file.chmod(0o600)
        dsn = dsn_file.read_text().strip()
        migrate_sqlite(template, dsn, "bench-import")
        env |= {
            "SPLITVAULT_PUBLIC_STATE_BACKEND": "postgres",
            "SPLITVAULT_PUBLIC_POSTGRES_DSN_FILE": str(dsn_file),
        }
        store = PgKeyStore(open_pool(dsn, max_size=1), owns_pool=True)
    with closing(store):
        reads = admission_reads(store, secret, args.reads)
    sets: dict[str, list[TierProcess]] = {}
    try:
        for set_name, (_, policy) in SETS.items():
            policy_env = {**env, "SPLITVAULT_PUBLIC_PROTECTION__AUDIT_ON_FAILURE": policy}
            sets[set_name] = _start(layout, private, policy_env, names[set_name])
    except BaseException:
        Backend(backend, sets, None, "", "", reads).stop()
        raise
    pg = postgres if backend == "postgres" else None
    return Backend(backend, sets, pg, str(layout.public.ca_cert), secret, reads)


def bodies_of(model: str, seq: int) -> list[bytes]:
    """16 different batch-1 bodies of ``model``."""
    if model == "digits":
        images = digits.load_data().test_x
        return [v2_body({"image": images[i : i + 1]}) for i in range(16)]
    sentences = minilm.SENTENCES
    return [
        v2_body(
            {
                k: t.numpy()
                for k, t in minilm.tokenize([sentences[i % len(sentences)]], length=seq).items()
            }
        )
        for i in range(16)
    ]


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


def run_backend(backend: Backend, args: argparse.Namespace) -> list[Row]:
    """Per model: a warm-up round of every set, then ``--rounds`` interleaved rounds."""
    rows: list[Row] = []
    for model in MODELS:
        bodies = bodies_of(model, args.seq)
        for set_name in SETS:
            backend.round(set_name, model, bodies, args.warmup, args.concurrency)
        found = {name: Row(model, backend.name, name, []) for name in SETS}
        for _ in range(args.rounds):
            for set_name in SETS:
                found[set_name].rounds.append(
                    backend.round(set_name, model, bodies, args.seconds, args.concurrency)
                )
        rows += found.values()
    return rows


def ratio_lines(rows: Sequence[Row]) -> list[str]:
    """Commit vs queued, one replica: medians over rounds of per-round ratios."""
    lines = []
    by_key = {(r.model, r.backend, r.name): r for r in rows}
    for model in MODELS:
        for backend in BACKENDS:
            commit, queued = by_key[(model, backend, "commit")], by_key[(model, backend, "queued")]
            pairs = list(zip(commit.rounds, queued.rounds, strict=True))
            cpu = statistics.median(c.cpu_ms / q.cpu_ms for c, q in pairs)
            p50 = statistics.median(c.p50 / q.p50 for c, q in pairs)
            spread = [f"{c.cpu_ms / q.cpu_ms:.2f}" for c, q in pairs]
            lines.append(f"| {model} | {backend} | {cpu:.2f} ({', '.join(spread)}) | {p50:.2f} |")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=4.0, help="one measured round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per model")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--seq", type=int, default=64, help="MiniLM tokens per sentence")
    parser.add_argument("--reads", type=int, default=2000, help="admission reads timed")
    parser.add_argument("--out", type=Path, help="also write the table here")
    args = parser.parse_args(argv)
    rows: list[Row] = []
    reads: dict[str, tuple[float, float, float, float]] = {}
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        workdir = Path(tmp)
        layout, template, secret = prepare(workdir)
        postgres = PostgresServer().start()
        stack.callback(postgres.remove)
        private = start_private(layout.root, env=OPEN)
        stack.callback(private.stop)
        setup = (layout, template, secret, private, postgres)
        for name in BACKENDS:
            backend = start_backend(name, setup, workdir, args)
            try:
                rows += run_backend(backend, args)
                reads[name] = backend.reads
            finally:
                backend.stop()
    print("\n".join(report(rows, reads, args)))
    if args.out is not None:
        args.out.write_text("\n".join(report(rows, reads, args)) + "\n", encoding="utf-8")
    return 0


def report(
    rows: Sequence[Row],
    reads: dict[str, tuple[float, float, float, float]],
    args: argparse.Namespace,
) -> list[str]:
    return [
        f"state_backends: digits and MiniLM (seq {args.seq}), batch 1, c={args.concurrency}, "
        f"{args.rounds} interleaved rounds of {args.seconds:g} s per configuration, "
        f"{os.cpu_count()} cores shared by every process",
        "",
        "| model | backend | replicas, audit | answers/s | p50 ms | p99 ms | public time outside "
        "front+private ms/req | commit wait ms | public CPU ms/req | PostgreSQL CPU ms/req | "
        "errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *(row.line() for row in rows),
        "",
        "Commit before the answer vs only queued (the old writer), one replica: median of the "
        "per-round ratios (each round's ratio in brackets):",
        "",
        "| model | backend | public CPU per request, commit / queued | p50, commit / queued |",
        "|---|---|---|---|",
        *ratio_lines(rows),
        "",
        "Admission's store reads, sequential, in process (µs): the monitor decision (every "
        "request) and a key-cache miss (authenticate + accepted terms, once per key_cache_s):",
        "",
        "| backend | decision p50 | decision p99 | key-cache miss p50 | miss p99 |",
        "|---|---|---|---|---|",
        *(
            f"| {name} | {d50:.0f} | {d99:.0f} | {m50:.0f} | {m99:.0f} |"
            for name, (d50, d99, m50, m99) in reads.items()
        ),
    ]


if __name__ == "__main__":
    raise SystemExit(main())
