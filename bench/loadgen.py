"""A closed-loop HTTP load generator: N clients, each sending its next request when the
previous answer arrives, for a fixed window after a warm-up.

Every client has its own ``httpx.AsyncClient`` holding one HTTP/1.1 keep-alive connection.
Only requests that *complete* inside the measured window count; when the window closes the
clients stop sending and the requests still in flight are drained (not counted), so the next
measurement starts on an idle server.

    python bench/loadgen.py https://localhost:8443/v2/models/digits/infer --body body.json \
        --concurrency 8 --duration 10 --warmup 3 --ca deploy/public/tls/ca.crt \
        --header "Authorization: Bearer sv_..."
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import ssl
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

ERROR_PAUSE_S = 0.01  # a refused connection fails at once: do not spin on it


@dataclass(frozen=True)
class LoadSpec:
    """What to send, how many clients, for how long."""

    url: str
    bodies: Sequence[bytes]
    concurrency: int
    duration_s: float
    warmup_s: float
    headers: Mapping[str, str] = field(default_factory=dict)
    verify: ssl.SSLContext | bool = True
    timeout_s: float = 60.0
    drain_s: float = 60.0


@dataclass(frozen=True)
class LoadResult:
    """What completed inside the window: latencies of the answers, errors by kind."""

    concurrency: int
    window_s: float
    latencies_ms: list[float]
    errors: dict[str, int]
    answered: int = 0  # successful answers in the whole run, warm-up and drain included

    @property
    def completed(self) -> int:
        """Successful answers in the window."""
        return len(self.latencies_ms)

    @property
    def error_count(self) -> int:
        """Failed requests in the window (non-200 answers and transport errors)."""
        return sum(self.errors.values())

    @property
    def throughput(self) -> float:
        """Successful answers per second."""
        return self.completed / self.window_s if self.window_s > 0 else 0.0

    def percentile(self, q: float) -> float:
        """Latency percentile in ms (NaN when nothing completed)."""
        if not self.latencies_ms:
            return float("nan")
        return float(np.percentile(self.latencies_ms, q))

    def summary(self) -> dict[str, object]:
        """A JSON-friendly digest."""
        return {
            "concurrency": self.concurrency,
            "window_s": round(self.window_s, 3),
            "completed": self.completed,
            "throughput_rps": round(self.throughput, 2),
            "p50_ms": round(self.percentile(50), 2),
            "p99_ms": round(self.percentile(99), 2),
            "errors": self.errors,
        }


Record = tuple[float, float, str | None]  # start, end, error kind (None: success)


@contextmanager
def heap_frozen() -> Iterator[None]:
    """Keep the objects that exist now out of this process's collector passes until exit.

    The load generator runs in the benchmark's process, which also holds torch and the models
    it prepared: a full collection there walked all of them, stalled every client for 250-285
    ms and was measured as a p99 of about 300 ms in one digits c=32 point in two or three
    (found with a ``gc.callbacks`` probe, 2026-12-07). Collected once before the window, the
    heap is frozen; objects made during the window are collected as usual. A heap someone else
    froze (a tier's startup objects, when run in one process) stays frozen."""
    frozen_before = gc.get_freeze_count() > 0
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        if not frozen_before:
            gc.unfreeze()


async def run_load(spec: LoadSpec) -> LoadResult:
    """Drive ``spec.concurrency`` closed-loop clients and summarise the measured window."""
    if spec.concurrency < 1 or spec.duration_s <= 0 or spec.warmup_s < 0 or not spec.bodies:
        raise ValueError("concurrency >= 1, duration > 0, warmup >= 0 and a body are needed")
    with heap_frozen():
        return await _run_load(spec)


async def _run_load(spec: LoadSpec) -> LoadResult:
    window_start = time.perf_counter() + spec.warmup_s
    window_end = window_start + spec.duration_s
    records: list[Record] = []
    clients = [_client(spec) for _ in range(spec.concurrency)]
    try:
        workers = [
            asyncio.create_task(_worker(spec, client, index, window_end, records))
            for index, client in enumerate(clients)
        ]
        limit = window_end - time.perf_counter() + spec.drain_s
        done, stuck = await asyncio.wait(workers, timeout=limit)
        for task in stuck:  # still waiting long after the window: give up on them
            task.cancel()
        await asyncio.gather(*stuck, return_exceptions=True)
        for task in done:
            task.result()  # a bug in a worker surfaces here
    finally:
        await asyncio.gather(*(client.aclose() for client in clients), return_exceptions=True)
    return summarise(records, spec.concurrency, window_start, window_end)


def summarise(
    records: Sequence[Record], concurrency: int, window_start: float, window_end: float
) -> LoadResult:
    """Keep the requests that completed inside ``[window_start, window_end]``."""
    inside = [r for r in records if window_start <= r[1] <= window_end]
    latencies = [(end - start) * 1000.0 for start, end, error in inside if error is None]
    errors = Counter(error for _, _, error in inside if error is not None)
    answered = sum(1 for _, _, error in records if error is None)
    return LoadResult(concurrency, window_end - window_start, latencies, dict(errors), answered)


def _client(spec: LoadSpec) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        http1=True,
        http2=False,
        verify=spec.verify,
        headers={"Content-Type": "application/json", **spec.headers},
        timeout=spec.timeout_s,
        limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
    )


async def _worker(
    spec: LoadSpec, client: httpx.AsyncClient, index: int, window_end: float, sink: list[Record]
) -> None:
    position = index
    while time.perf_counter() < window_end:
        body = spec.bodies[position % len(spec.bodies)]
        position += spec.concurrency
        error: str | None = None
        started = time.perf_counter()
        try:
            response = await client.post(spec.url, content=body)
            if response.status_code != 200:
                error = f"HTTP {response.status_code}"
        except httpx.HTTPError as exc:
            error = type(exc).__name__
        sink.append((started, time.perf_counter(), error))
        if error is not None:
            await asyncio.sleep(ERROR_PAUSE_S)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    parser = argparse.ArgumentParser(description="closed-loop HTTP POST load generator")
    parser.add_argument("url")
    parser.add_argument("--body", type=Path, required=True, help="file holding the JSON body")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds before measuring")
    parser.add_argument("--ca", type=Path, help="CA certificate to verify the server with")
    parser.add_argument("--header", action="append", default=[], help="'Name: value'")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one load point and print its summary as JSON."""
    args = parse_args(argv)
    headers = dict(h.split(":", 1) for h in args.header)
    verify: ssl.SSLContext | bool = True
    if args.ca is not None:
        verify = ssl.create_default_context(cafile=str(args.ca))
    spec = LoadSpec(
        args.url,
        [args.body.read_bytes()],
        args.concurrency,
        args.duration,
        args.warmup,
        headers={k.strip(): v.strip() for k, v in headers.items()},
        verify=verify,
    )
    print(json.dumps(asyncio.run(run_load(spec)).summary()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
