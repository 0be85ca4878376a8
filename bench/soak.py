"""Soak: a fixed request rate against both tiers, protections on, for several minutes.

Trains and packs the digits CNN into a temporary deployment (with its reference profile, so the
extraction monitor runs fully), starts both tiers as subprocesses on loopback with every
protection at its defaults (API key, terms, rate limits, monitor action ``block``, audit trail;
only the per-address limit is raised, since every simulated client shares one address), issues
``--keys`` API keys that each accept the terms, and sends natural test digits (one image per
request, keys in turn) open-loop: request i leaves at ``start + i / rate`` whether or not
earlier answers came back, and its latency is measured from that scheduled time, so a stalled
server shows up as latency instead of a lower rate.

The load is spread over many keys because one key sending 20 natural queries a second is, by
design, an extraction suspect: the monitor blocks such a key after about 2,300 queries (see
``public_api/monitor/config.py``). With the default 50 keys each sends 0.4 requests a second.

It reports every non-200 answer and transport error (the target is zero), p50/p95/p99 latency
per minute, each tier's resident memory (VmRSS from /proc/PID/status) after the warm-up and at
the end with its growth (target under 10%), and checks that the audit trail holds one intact
record per request.

Run from the repository root:
    .venv/bin/python bench/soak.py                       # 20 req/s for 5 minutes
    .venv/bin/python bench/soak.py --minutes 1 --rate 10 # a quick run
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
import ssl
import tempfile
import threading
import time
from collections.abc import Sequence
from contextlib import ExitStack, closing
from dataclasses import dataclass, field

import httpx
import numpy as np
import torch

from public_api.audit import AUDIT_DB, verify_chain
from public_api.keys import KEYS_DB, STATE_DIR, SqliteKeyStore
from shared.keys import LocalFileKeyProvider
from shared.layout import DeployLayout
from shared.manifest import TopKPolicy
from splitvault.demo import digits
from splitvault.deploy import init_deployment
from splitvault.launcher import TierProcess, start_both
from splitvault.packing.pack import pack_spec

MODEL = "digits"
RSS_PERIOD_S = 5.0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=20.0, help="requests per second")
    parser.add_argument("--minutes", type=float, default=5.0, help="measured duration")
    parser.add_argument("--warmup", type=float, default=20.0, help="seconds before measuring")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per tier")
    parser.add_argument("--keys", type=int, default=50, help="API keys sharing the load")
    parser.add_argument("--out", type=Path, help="also write the report as markdown here")
    return parser.parse_args(argv)


@dataclass
class Sample:
    """One request: when it was due, how long until its answer, what came back."""

    due_s: float
    latency_ms: float
    status: int | str


@dataclass
class Memory:
    """VmRSS samples (MiB) of one process, over time."""

    pid: int
    samples: list[tuple[float, float]] = field(default_factory=list)

    def sample(self, now: float) -> None:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                self.samples.append((now, int(line.split()[1]) / 1024))

    def at(self, when: float) -> float:
        """The last sample taken at or before ``when`` (the first one if none)."""
        before = [mib for at, mib in self.samples if at <= when]
        return before[-1] if before else self.samples[0][1]


def prepare(workdir: Path) -> tuple[DeployLayout, digits.DigitsData]:
    """A deployment with the digits CNN packed (top-3), as ``splitvault pack`` would."""
    data = digits.load_data()
    net = digits.train(data)
    layout = init_deployment(workdir / "deploy")
    pack_spec(
        digits.spec_for(net, data),
        name=MODEL,
        split=digits.SPLIT,
        layout=layout,
        provider=LocalFileKeyProvider.load(layout.kek),
        policy=TopKPolicy(k=3),
        show_progress=False,
    )
    return layout, data


def issue_keys(layout: DeployLayout, count: int) -> list[str]:
    """``count`` API keys with the default limits."""
    with closing(SqliteKeyStore(layout.public.root / STATE_DIR / KEYS_DB)) as store:
        return [store.create(f"soak-{i}")[1] for i in range(count)]


def start_tiers(layout: DeployLayout, threads: int, stack: ExitStack) -> list[TierProcess]:
    """Both tiers with default protections; only the per-address limit is raised (one client
    address sends everything)."""
    env = {
        "SPLITVAULT_PRIVATE_TORCH_THREADS": str(threads),
        "SPLITVAULT_PUBLIC_TORCH_THREADS": str(threads),
        "SPLITVAULT_PUBLIC_PROTECTION__IP_LIMITS__RATE_PER_S": "100000",
        "SPLITVAULT_PUBLIC_PROTECTION__IP_LIMITS__BURST": "100000",
    }
    return list(start_both(layout.root, stack, env=env))


def bodies(data: digits.DigitsData) -> list[bytes]:
    """One v2 request per natural test image."""
    encoded = []
    for image in data.test_x:
        x = image[None]
        tensor = {"name": "image", "shape": list(x.shape), "datatype": "FP32"}
        tensor["data"] = x.ravel().tolist()
        encoded.append(json.dumps({"inputs": [tensor]}).encode())
    return encoded


async def send_at_rate(
    http: httpx.AsyncClient, payloads: list[bytes], keys: list[str], rate: float, seconds: float
) -> list[Sample]:
    """Open loop: request i is due at ``start + i / rate``; keys take turns."""
    samples: list[Sample] = []
    start = time.monotonic()

    async def one(i: int, due: float) -> None:
        headers = {"Authorization": f"Bearer {keys[i % len(keys)]}"}
        try:
            reply = await http.post(
                f"/v2/models/{MODEL}/infer", content=payloads[i % len(payloads)], headers=headers
            )
            status: int | str = reply.status_code
        except httpx.HTTPError as error:
            status = type(error).__name__
        samples.append(Sample(due - start, (time.monotonic() - due) * 1000, status))

    tasks = []
    for i in range(int(rate * seconds)):
        due = start + i / rate
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        tasks.append(asyncio.create_task(one(i, due)))
    await asyncio.gather(*tasks)
    return samples


def watch_memory(memories: list[Memory], stop: threading.Event) -> threading.Thread:
    def run() -> None:
        while True:
            for memory in memories:
                memory.sample(time.monotonic())
            if stop.wait(RSS_PERIOD_S):
                return

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _percentiles(samples: list[Sample]) -> str:
    ok = [s.latency_ms for s in samples if s.status == 200]
    if not ok:
        return "-"
    p50, p95, p99 = np.percentile(ok, [50, 95, 99])
    return f"{p50:7.1f} {p95:7.1f} {p99:7.1f}"


def report(
    samples: list[Sample], memories: dict[str, Memory], measured_from: float, ended: float
) -> list[str]:
    """The per-minute table, the error count and the memory growth, as lines."""
    errors = [s for s in samples if s.status != 200]
    lines = ["minute  sent  errors  p50_ms  p95_ms  p99_ms  RSS_MiB(" + "/".join(memories) + ")"]
    for minute in range(int(max(s.due_s for s in samples) // 60) + 1):
        batch = [s for s in samples if minute * 60 <= s.due_s < (minute + 1) * 60]
        wrong = sum(s.status != 200 for s in batch)
        rss = "/".join(f"{m.at(measured_from + (minute + 1) * 60):.0f}" for m in memories.values())
        lines.append(f"{minute + 1:6d} {len(batch):5d} {wrong:7d} {_percentiles(batch)}  {rss}")
    lines.append(f"all    {len(samples):5d} {len(errors):7d} {_percentiles(samples)}")
    if errors:
        kinds: dict[str, int] = {}
        for s in errors:
            kinds[str(s.status)] = kinds.get(str(s.status), 0) + 1
        lines.append(f"errors by kind: {kinds}")
    for name, memory in memories.items():
        first, last = memory.at(measured_from), memory.at(ended)
        lines.append(
            f"{name} tier RSS: {first:.1f} MiB after warm-up -> {last:.1f} MiB at the end "
            f"({(last - first) / first * 100:+.1f}%, peak {max(m for _, m in memory.samples):.1f})"
        )
    return lines


async def soak(
    url: str, layout: DeployLayout, keys: list[str], payloads: list[bytes], args: argparse.Namespace
) -> tuple[list[Sample], float, float]:
    """Warm up, then the measured run; returns (samples, measured_from, ended) in monotonic s."""
    context = ssl.create_default_context(cafile=str(layout.public.ca_cert))
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    headers = {"Content-Type": "application/json"}
    async with httpx.AsyncClient(
        base_url=url, verify=context, headers=headers, limits=limits, timeout=30
    ) as http:
        for key in keys:
            accepted = await http.post(
                "/v1/terms/accept",
                json={"version": "1"},
                headers={"Authorization": f"Bearer {key}"},
            )
            accepted.raise_for_status()
        await send_at_rate(http, payloads, keys, args.rate, args.warmup)
        measured_from = time.monotonic()
        samples = await send_at_rate(http, payloads, keys, args.rate, args.minutes * 60)
        return samples, measured_from, time.monotonic()


def monitor_line(private: TierProcess) -> str:
    """What the private tier's activation monitor (on, at its defaults) made of the traffic."""
    events = private.events()
    alerts = sum(e.get("event") == "private_monitor_alert" for e in events)
    off = any(e.get("setting") == "activation_monitor" for e in events)  # unsafe_setting
    state = "OFF or recording only" if off else "on, refusing"
    return f"private activation monitor ({state}): {alerts} alerts; its refusals would be 403s"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        layout, data = prepare(Path(tmp))
        keys = issue_keys(layout, args.keys)
        public, private = start_tiers(layout, args.threads, stack)
        memories = {"public": Memory(public.process.pid), "private": Memory(private.process.pid)}
        stop = threading.Event()
        watcher = watch_memory(list(memories.values()), stop)
        url = f"https://localhost:{public.port}"
        samples, measured_from, ended = asyncio.run(soak(url, layout, keys, bodies(data), args))
        stop.set()
        watcher.join()
        for memory in memories.values():
            memory.sample(time.monotonic())
        lines = [
            f"soak: {args.rate:g} req/s for {args.minutes:g} min after {args.warmup:g} s warm-up,"
            f" model {MODEL}, {args.keys} API keys, torch threads {args.threads} per tier",
            *report(samples, memories, measured_from, ended),
        ]
        lines.append(monitor_line(private))
        public.stop()  # flushes the audit trail
        audit = verify_chain(layout.public.root / STATE_DIR / AUDIT_DB)
        expected = int(args.rate * args.warmup) + len(samples)
        lines.append(
            f"audit trail: {audit.records} records for {expected} requests, "
            f"chain {'intact' if audit.ok else 'BROKEN: ' + str(audit.problem)}"
        )
    lines.append(f"({time.monotonic() - started:.0f} s in all)")
    print("\n".join(lines))
    if args.out is not None:
        args.out.write_text("```\n" + "\n".join(lines) + "\n```\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
