"""What the public tier's state backend costs per request: SQLite vs PostgreSQL, one replica and
three, side by side in one run (issue 15).

The digits CNN is trained and packed into a temporary deployment; one private tier serves every
configuration. Each configuration starts its public replicas afresh: ``sqlite`` gives each
replica its own state folder (a copy of one key store: today's one-host layout), ``postgres``
puts keys, terms, monitor decisions and one audit chain per replica in a fresh database of a
throwaway PostgreSQL on a Unix socket (the key moved there by ``state migrate``). Limits are
raised out of the way and kept in memory, so only the state backend differs. ``--concurrency``
closed-loop clients (batch 1), spread evenly over the replicas, run ``--seconds`` after a
warm-up. Reported per configuration:

- answers/s and the clients' p50/p99 (ms);
- public overhead: the public tier's own histograms, whole request minus front stages minus the
  private call, per request (ms): admission (key, terms, monitor decision), audit commit, HTTP;
- public CPU per request: user + system CPU of all public replicas (/proc/PID/stat) over the
  measured run, divided by the answers; PostgreSQL's CPU (postmaster and backends) likewise.

Every process shares this machine's cores: compare the cost per request; three replicas on two
cores add no throughput, and scaling must be measured on more cores. Run from the repository
root (about two minutes):  .venv/bin/python bench/state_backends.py --seconds 10
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
from shared.manifest import TopKPolicy
from splitvault.demo import digits
from splitvault.deploy import init_deployment
from splitvault.launcher import TierProcess, start_private, start_public
from splitvault.packing.pack import pack_spec
from splitvault.state_migrate import migrate_sqlite
from tests.support.postgres_server import PostgresServer

MODEL = "digits"
CONFIGS = (("sqlite", 1), ("postgres", 1), ("sqlite", 3), ("postgres", 3))
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
SUMS = ("splitvault_request_seconds", "splitvault_front_seconds", "splitvault_private_call_seconds")


@dataclass
class Row:
    """One configuration's figures."""

    backend: str
    replicas: int
    result: LoadResult
    answered: int
    overhead_ms: float
    public_cpu_ms: float
    postgres_cpu_ms: float | None
    reads_us: tuple[float, float, float, float]

    def line(self) -> str:
        pg = "-" if self.postgres_cpu_ms is None else f"{self.postgres_cpu_ms:.2f}"
        return (
            f"| {self.backend} | {self.replicas} | {self.result.throughput:.0f} | "
            f"{self.result.percentile(50):.1f} | {self.result.percentile(99):.1f} | "
            f"{self.overhead_ms:.2f} | {self.public_cpu_ms:.2f} | {pg} | "
            f"{sum(self.result.errors.values())} |"
        )

    def reads_line(self) -> str:
        decision_p50, decision_p99, miss_p50, miss_p99 = self.reads_us
        return (
            f"| {self.backend} | {decision_p50:.0f} | {decision_p99:.0f} | {miss_p50:.0f} | "
            f"{miss_p99:.0f} |"
        )


def prepare(workdir: Path) -> tuple[DeployLayout, Path, str]:
    """A deployment with the digits CNN, and a state folder holding one key that accepted the
    terms (the template every configuration starts from)."""
    data = digits.load_data()
    layout = init_deployment(workdir / "deploy")
    pack_spec(
        digits.spec_for(digits.train(data, epochs=4), data),
        name=MODEL,
        split=digits.SPLIT,
        layout=layout,
        provider=LocalFileKeyProvider.load(layout.kek),
        policy=TopKPolicy(k=3),
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


def _sums(replicas: Sequence[TierProcess]) -> dict[str, float]:
    """Sum and count of the request, front and private-call histograms over all replicas."""
    found = dict.fromkeys([f"{name}_sum" for name in SUMS] + ["count"], 0.0)
    for replica in replicas:
        text = httpx.get(replica.metrics_url, timeout=10).text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name in found:
                    found[sample.name] += sample.value
                elif sample.name == "splitvault_request_seconds_count":
                    found["count"] += sample.value
    return found


def _start(
    layout: DeployLayout, private: TierProcess, env: dict[str, str], n: int
) -> list[TierProcess]:
    started: list[TierProcess] = []
    try:
        for i in range(n):
            replica_env = {**env, "SPLITVAULT_PUBLIC_REPLICA_NAME": f"bench-{i}"}
            if "{i}" in env.get("SPLITVAULT_PUBLIC_STATE_DIR", ""):
                replica_env["SPLITVAULT_PUBLIC_STATE_DIR"] = env[
                    "SPLITVAULT_PUBLIC_STATE_DIR"
                ].format(i=i)
            started.append(start_public(layout.root, private.port, env=replica_env))
    except BaseException:
        for replica in started:
            replica.stop()
        raise
    return started


async def _load(
    replicas: Sequence[TierProcess], ca: str, secret: str, body: bytes, concurrency: int, s: float
) -> LoadResult:
    """``concurrency`` clients spread evenly over ``replicas``; one merged result."""
    context = ssl.create_default_context(cafile=ca)
    shares = [concurrency // len(replicas) + (i < concurrency % len(replicas)) for i in range(
        len(replicas))]  # fmt: skip
    results = await asyncio.gather(
        *(
            run_load(
                LoadSpec(
                    url=f"https://localhost:{r.port}/v2/models/{MODEL}/infer",
                    bodies=[body],
                    concurrency=share,
                    duration_s=s,
                    warmup_s=0.0,
                    headers={"Authorization": f"Bearer {secret}"},
                    verify=context,
                )
            )
            for r, share in zip(replicas, shares, strict=True)
        )
    )
    errors: dict[str, int] = {}
    for result in results:
        for kind, count in result.errors.items():
            errors[kind] = errors.get(kind, 0) + count
    latencies = [ms for result in results for ms in result.latencies_ms]
    answered = sum(result.answered for result in results)
    return LoadResult(concurrency, results[0].window_s, latencies, errors, answered)


def measure(
    backend: str,
    n: int,
    setup: tuple[DeployLayout, Path, str, TierProcess, PostgresServer],
    workdir: Path,
    args: argparse.Namespace,
) -> Row:
    """Start ``n`` replicas on ``backend``, warm up, measure, stop them."""
    layout, template, secret, private, postgres = setup
    name = f"{backend}-{n}"
    env = {**OPEN, "SPLITVAULT_PUBLIC_METRICS_PORT": "0"}
    if backend == "sqlite":
        for i in range(n):
            shutil.copytree(template, workdir / f"{name}-{i}")
        env["SPLITVAULT_PUBLIC_STATE_DIR"] = str(workdir / f"{name}-{{i}}")
    else:
        dsn_file = workdir / f"{name}.dsn"
        dsn_file.write_text(postgres.create_database(name.replace("-", "_")) + "\n")
        dsn_file.chmod(0o600)
        dsn = dsn_file.read_text().strip()
        migrate_sqlite(template, dsn, "bench-import")
        env |= {
            "SPLITVAULT_PUBLIC_STATE_BACKEND": "postgres",
            "SPLITVAULT_PUBLIC_POSTGRES_DSN_FILE": str(dsn_file),
            "SPLITVAULT_PUBLIC_STATE_DIR": str(workdir / f"{name}-{{i}}"),
        }
    store: KeyStore = (
        SqliteKeyStore(workdir / f"{name}-0" / KEYS_DB)
        if backend == "sqlite"
        else PgKeyStore(open_pool(dsn, max_size=1), owns_pool=True)
    )
    with closing(store):
        reads = admission_reads(store, secret, args.reads)
    replicas = _start(layout, private, env, n)
    try:
        ca, body = str(layout.public.ca_cert), _body()
        asyncio.run(_load(replicas, ca, secret, body, args.concurrency, args.warmup))
        pids = [r.process.pid for r in replicas]
        pg = _postgres_pids(postgres) if backend == "postgres" else []
        before, cpu, pg_cpu = _sums(replicas), _cpu_s(pids), _cpu_s(pg)
        result = asyncio.run(_load(replicas, ca, secret, body, args.concurrency, args.seconds))
        cpu, pg_cpu = _cpu_s(pids) - cpu, _cpu_s(pg) - pg_cpu
        after = _sums(replicas)
    finally:
        for replica in replicas:
            replica.stop()
    delta = {k: after[k] - before[k] for k in after}
    count = max(delta["count"], 1.0)
    request, front, call = (delta[f"{s}_sum"] for s in SUMS)
    answered = max(result.answered, 1)
    return Row(
        backend,
        n,
        result,
        result.answered,
        (request - front - call) / count * 1000,
        cpu / answered * 1000,
        pg_cpu / answered * 1000 if backend == "postgres" else None,
        reads,
    )


def _body() -> bytes:
    image = np.zeros((1, 1, 8, 8), np.float32).ravel().tolist()
    tensor = {"name": "image", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": image}
    return json.dumps({"inputs": [tensor]}).encode()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=10.0, help="measured run per config")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--reads", type=int, default=2000, help="admission reads timed")
    parser.add_argument("--out", type=Path, help="also write the table here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        workdir = Path(tmp)
        layout, template, secret = prepare(workdir)
        postgres = PostgresServer().start()
        stack.callback(postgres.remove)
        private = start_private(layout.root, env=OPEN)
        stack.callback(private.stop)
        setup = (layout, template, secret, private, postgres)
        rows = [measure(backend, n, setup, workdir, args) for backend, n in CONFIGS]
    lines = [
        f"state_backends: digits, batch 1, c={args.concurrency}, {args.seconds:g} s per "
        f"configuration, {os.cpu_count()} cores shared by every process",
        "",
        "| backend | replicas | answers/s | p50 ms | p99 ms | public time outside front+private "
        "ms/req | "
        "public CPU ms/req | PostgreSQL CPU ms/req | errors |",
        "|---|---|---|---|---|---|---|---|---|",
        *(row.line() for row in rows),
        "",
        "Admission's store reads, sequential, in process (µs): the monitor decision (every "
        "request) and a key-cache miss (authenticate + accepted terms, once per key_cache_s):",
        "",
        "| backend | decision p50 | decision p99 | key-cache miss p50 | miss p99 |",
        "|---|---|---|---|---|",
        *(row.reads_line() for row in rows if row.replicas == 1),
    ]
    lines += [
        f"errors ({r.backend}, {r.replicas}): {r.result.errors}" for r in rows if r.result.errors
    ]
    print("\n".join(lines))
    if args.out is not None:
        args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
