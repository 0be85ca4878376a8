"""Pre-authentication flood: anonymous clients streaming large bodies vs one keyed client.

Red-team finding 2: a large JSON body used to be read and parsed before the API key was checked,
so anonymous clients could slow every legitimate client down and grow the public process. This
script trains and packs the digits CNN into a temporary deployment, starts both tiers on
loopback (limits raised so the keyed client is never refused), and then:

1. **idle**: one keyed client sends ``--idle-requests`` sequential batch-1 requests over one
   kept-alive connection; its p50 latency is the baseline;
2. **flood**: ``--flooders`` anonymous clients (threads of a separate process), each on a new
   TLS connection per request, send the headers of a ``--body-mb`` MB JSON inference body
   without ``Authorization`` and then stream the body until the server answers or closes; for
   ``--seconds`` the keyed client keeps sending as in 1.

It reports the keyed client's p50 (idle and under flood, and the ratio), the public process's
resident memory (before the flood and its peak during it), how long each anonymous request
waited for its answer, and the bytes the server read per anonymous request: the growth of the
public process's ``rchar`` (/proc/PID/io: every byte it read from sockets and files) divided by
the anonymous answers, an upper bound on what it read of each request (TLS records included).

Targets (issue 12): keyed p50 under flood <= 2x idle, growth <= 50 MB, <= 64 KiB read per
anonymous request. Run from the repository root (about a minute):

    .venv/bin/python bench/preauth_flood.py
    .venv/bin/python bench/preauth_flood.py --flooders 16 --body-mb 15 --seconds 20
"""

# ruff: noqa: E402 - the repository root goes on sys.path before the project imports.
from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import argparse
import json
import multiprocessing
import os
import socket
import ssl
import statistics
import tempfile
import threading
import time
from collections.abc import Sequence
from contextlib import ExitStack, closing
from dataclasses import dataclass
from multiprocessing.synchronize import Event as EventType

import httpx
import numpy as np
import torch

from public_api.keys import KEYS_DB, STATE_DIR, SqliteKeyStore
from public_api.terms import load_terms
from shared.keys import LocalFileKeyProvider
from shared.layout import DeployLayout
from shared.manifest import TopKPolicy
from splitvault.demo import digits
from splitvault.deploy import init_deployment
from splitvault.launcher import start_both
from splitvault.packing.pack import pack_spec

MODEL = "digits"
INFER = f"/v2/models/{MODEL}/infer"
CHUNK = 64 * 1024
OPEN = {  # limits out of the way: only the pre-authentication path is measured
    "SPLITVAULT_PRIVATE_TORCH_THREADS": "1",
    "SPLITVAULT_PUBLIC_TORCH_THREADS": "1",
    "SPLITVAULT_PUBLIC_PROTECTION__KEY_LIMITS__RATE_PER_S": "1000000",
    "SPLITVAULT_PUBLIC_PROTECTION__KEY_LIMITS__BURST": "1000000",
    "SPLITVAULT_PUBLIC_PROTECTION__KEY_LIMITS__DAILY_QUOTA": "100000000",
    "SPLITVAULT_PUBLIC_PROTECTION__IP_LIMITS__RATE_PER_S": "1000000",
    "SPLITVAULT_PUBLIC_PROTECTION__IP_LIMITS__BURST": "1000000",
    "SPLITVAULT_PUBLIC_PROTECTION__MONITOR_ACTION": "record",
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flooders", type=int, default=16)
    parser.add_argument("--body-mb", type=float, default=15.0)
    parser.add_argument("--seconds", type=float, default=20.0, help="length of the flood")
    parser.add_argument("--idle-requests", type=int, default=200)
    parser.add_argument(
        "--nice",
        type=int,
        default=19,
        help="niceness of the flooders' process (19: on a small machine their own CPU, "
        "encrypting megabytes per request, would be measured instead of the server's work)",
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the report here")
    return parser.parse_args(argv)


def prepare(workdir: Path) -> tuple[DeployLayout, str]:
    """A deployment with the digits CNN packed and one API key that accepted the terms."""
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
    terms = load_terms(layout.public.root / "terms.md", "1")
    with closing(SqliteKeyStore(layout.public.root / STATE_DIR / KEYS_DB)) as store:
        key, secret = store.create("keyed")
        store.record_acceptance(key.key_id, terms.version, terms.sha256, "127.0.0.1", 0.0)
    return layout, secret


def flood_body(megabytes: float) -> bytes:
    """A well-formed inference body of about ``megabytes`` MB: one long FP32 tensor."""
    count = int(megabytes * 1e6) // 9  # "0.123456," per value
    data = ",".join(["0.123456"] * count)
    head = f'{{"inputs":[{{"name":"image","shape":[{count}],"datatype":"FP32","data":['
    return (head + data + "]}]}").encode()


@dataclass
class Refusal:
    """One anonymous request: status seen, seconds to the answer, bytes sent before it."""

    status: int
    seconds: float
    sent: int


def flood_one(port: int, ca: str, body: bytes, source: str | None = None) -> Refusal:
    """One anonymous request on a new TLS connection (from loopback address ``source``): its
    headers, then its body in chunks until the server answers or closes."""
    context = ssl.create_default_context(cafile=ca)
    address = None if source is None else (source, 0)
    raw = socket.create_connection(("127.0.0.1", port), timeout=30, source_address=address)
    with context.wrap_socket(raw, server_hostname="localhost") as sock:
        head = (
            f"POST {INFER} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        sock.sendall(head)
        started, sent, answer = time.monotonic(), 0, None
        try:
            while sent < len(body) and answer is None:
                sock.sendall(body[sent : sent + CHUNK])
                sent += min(CHUNK, len(body) - sent)
                answer = _poll(sock)
            if answer is None:
                answer = sock.recv(4096)
        except (OSError, ssl.SSLError):  # closed while sending: the answer may still be there
            answer = _last_words(sock)
        seconds = time.monotonic() - started
    status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0
    return Refusal(status, seconds, sent)


def _poll(sock: ssl.SSLSocket) -> bytes | None:
    """What the server sent so far (``b""``: it closed), or ``None`` while it sent nothing.

    (Not ``select``: TLS 1.3 session tickets make the socket readable with no answer in them.)
    """
    sock.setblocking(False)
    try:
        return sock.recv(4096)
    except (ssl.SSLWantReadError, BlockingIOError):
        return None
    finally:
        sock.settimeout(30)


def _last_words(sock: ssl.SSLSocket) -> bytes:
    try:
        return sock.recv(4096)
    except (OSError, ssl.SSLError):
        return b""


def _flooder(
    port: int, ca: str, body: bytes, stop: EventType, results: list[Refusal], source: str | None
) -> None:
    while not stop.is_set():
        try:
            results.append(flood_one(port, ca, body, source))
        except (OSError, ssl.SSLError):
            results.append(Refusal(0, 0.0, 0))


def flood_process(
    port: int,
    ca: str,
    megabytes: float,
    threads: int,
    stop: EventType,
    out: multiprocessing.Queue[list[tuple[int, float, int]]],
    niceness: int = 0,
    source: str | None = None,
) -> None:
    """Run ``threads`` flooders (from loopback address ``source``) until ``stop``; put their
    refusals (as tuples) on ``out``."""
    os.nice(niceness)
    body = flood_body(megabytes)
    results: list[Refusal] = []
    workers = [
        threading.Thread(target=_flooder, args=(port, ca, body, stop, results, source), daemon=True)
        for _ in range(threads)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    out.put([(r.status, r.seconds, r.sent) for r in results])


def _proc(pid: int, name: str, field: str) -> int:
    for line in Path(f"/proc/{pid}/{name}").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} for process {pid}")


def rss_mb(pid: int) -> float:
    return _proc(pid, "status", "VmRSS:") / 1024


def keyed_latencies(
    http: httpx.Client, body: bytes, *, count: int = 0, until: float = 0
) -> list[float]:
    """Sequential keyed requests (``count`` of them, or until ``until``); ms each."""
    latencies: list[float] = []
    while (count and len(latencies) < count) or (until and time.monotonic() < until):
        started = time.monotonic()
        reply = http.post(INFER, content=body)
        if reply.status_code != 200:
            raise RuntimeError(f"keyed request refused: {reply.status_code} {reply.text}")
        latencies.append((time.monotonic() - started) * 1000)
    return latencies


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        layout, key = prepare(Path(tmp))
        public, _private = start_both(layout.root, stack, env=OPEN)
        pid, ca = public.process.pid, str(layout.public.ca_cert)
        image = np.zeros((1, 1, 8, 8), np.float32).ravel().tolist()
        tensor = {"name": "image", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": image}
        keyed_body = json.dumps({"inputs": [tensor]}).encode()
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        context = ssl.create_default_context(cafile=ca)
        url = f"https://localhost:{public.port}"
        with httpx.Client(base_url=url, verify=context, headers=headers, timeout=60) as http:
            keyed_latencies(http, keyed_body, count=20)  # warm-up
            idle = keyed_latencies(http, keyed_body, count=args.idle_requests)
            rss_before, read_before = rss_mb(pid), _proc(pid, "io", "rchar:")
            stop = multiprocessing.Event()
            out: multiprocessing.Queue[list[tuple[int, float, int]]] = multiprocessing.Queue()
            flooders = multiprocessing.Process(
                target=flood_process,
                args=(public.port, ca, args.body_mb, args.flooders, stop, out, args.nice),
            )
            flooders.start()
            peak = [rss_before]

            def watch() -> None:
                while not stop.wait(0.2):
                    peak.append(rss_mb(pid))

            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
            time.sleep(2.0)  # the flooders build their bodies and get going
            flooded = keyed_latencies(http, keyed_body, until=time.monotonic() + args.seconds)
            stop.set()
            refusals = [Refusal(*item) for item in out.get(timeout=120)]
            flooders.join(60)
            watcher.join()
            read = _proc(pid, "io", "rchar:") - read_before
        answered = [r for r in refusals if r.status]
        idle_p50, flood_p50 = statistics.median(idle), statistics.median(flooded)
        statuses = {
            s: sum(r.status == s for r in refusals) for s in sorted({r.status for r in refusals})
        }
        lines = [
            f"preauth_flood: {args.flooders} anonymous clients x {args.body_mb:g} MB bodies for "
            f"{args.seconds:g} s (niceness {args.nice}) vs one keyed client (digits, batch 1)",
            f"keyed p50: idle {idle_p50:.1f} ms ({len(idle)} requests), under flood "
            f"{flood_p50:.1f} ms ({len(flooded)} requests): x{flood_p50 / idle_p50:.2f}",
            f"public RSS: {rss_before:.0f} MB before, peak {max(peak):.0f} MB during the flood "
            f"(+{max(peak) - rss_before:.0f} MB)",
            f"anonymous requests: {len(refusals)}, statuses {statuses}",
        ]
        if answered:
            waits = sorted(r.seconds for r in answered)
            sent = sorted(r.sent for r in answered)
            lines += [
                f"anonymous wait for the answer: p50 {statistics.median(waits) * 1000:.0f} ms, "
                f"max {waits[-1] * 1000:.0f} ms",
                f"body bytes the client got to send before the answer: p50 "
                f"{statistics.median(sent) / 1024:.0f} KiB, max {sent[-1] / 1024:.0f} KiB",
                f"bytes the public process read (rchar) per anonymous request: "
                f"{read / len(answered) / 1024:.0f} KiB",
            ]
    print("\n".join(lines))
    if args.out is not None:
        args.out.write_text("```\n" + "\n".join(lines) + "\n```\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
