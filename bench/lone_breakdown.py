"""Where one lone MiniLM request (c=1) spends its time, end to end, from both tiers' phase marks.

Both tiers run as in ``bench/serving_comparison.py`` (every protection on, HTTPS to the public
tier, mutual-TLS gRPC between the tiers) with ``debug_phase_marks`` on; requests are sent one
at a time and each one's marks (``shared/phases.py``, one system-wide monotonic clock) are
spliced into one timeline with the client's send and receipt. The table gives each step's
median; the in-process front, back and split compute at 1 and 2 torch threads come with it.

    .venv/bin/python bench/lone_breakdown.py --requests 300
"""

# ruff: noqa: E402 - the tiers' OpenMP wait is set before torch (and the other imports) load.
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# The in-process figures under the tiers' OpenMP wait (shared/openmp.py), set before torch
# loads; OMP_WAIT_POLICY or GOMP_SPINCOUNT in the environment wins, for both.
from shared.openmp import default_wait_policy

OPENMP_WAIT, _ = default_wait_policy()

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import httpx
import torch

from bench import split_compute
from bench.phase_breakdown import Marks, lone_table, merge
from bench.serving_comparison import create_key, minilm_workload, prepare
from bench.serving_systems import PROTECTED_ENV
from private_core.runner import forward
from public_api.front import run_front
from shared.batch_plan import assemble
from shared.keys import LocalFileKeyProvider
from splitvault.launcher import TierProcess, start_private, start_public

Timed = tuple[int, int]  # the client's send and receipt, CLOCK_MONOTONIC ns


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300, help="measured requests")
    parser.add_argument("--warmup", type=int, default=50, help="requests before measuring")
    parser.add_argument("--seq", type=int, default=128, help="MiniLM sequence length")
    parser.add_argument("--threads", type=int, default=1, help="each tier's torch_threads")
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for both tiers")
    return parser.parse_args(argv)


def send_lone(
    url: str, headers: Mapping[str, str], verify: Any, body: bytes, n: int
) -> list[Timed]:
    """``n`` requests one after another on one keep-alive connection; each one's send and
    receipt times."""
    times = []
    with httpx.Client(verify=verify, headers=dict(headers), timeout=30) as client:
        for _ in range(n):
            sent = time.monotonic_ns()
            client.post(url, content=body, headers={"content-type": "application/json"})
            times.append((sent, time.monotonic_ns()))
    return times


def phase_marks(tier: TierProcess) -> list[Marks]:
    """The tier's logged timelines, oldest first (those with no marks left out)."""
    found = []
    for event in tier.events():
        if event.get("event") == "request_phases" and event.get("marks"):
            found.append([(str(name), int(at)) for name, at in event["marks"]])
    return found


def timelines(client: Sequence[Timed], public: list[Marks], private: list[Marks]) -> list[Marks]:
    """Each request's merged timeline; its private marks are those that started during its
    private call (so a request the private tier never saw is left out)."""
    merged = []
    for sent, received in client:
        own = [marks for marks in public if sent <= marks[0][1] <= received]
        if len(own) != 1:
            continue
        call = dict(own[0])
        window = (call.get("activations_encoded", 0), call.get("private_replied", 0))
        inner = [marks for marks in private if window[0] <= marks[0][1] <= window[1]]
        if len(inner) == 1:
            merged.append(merge((sent, received), own[0], inner[0]))
    return merged


def median_ms(call: Callable[[], object], repeats: int = 40) -> float:
    """Median ms of ``call`` after one warm-up."""
    call()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def in_process(layout: Any, inputs: Mapping[str, Any]) -> list[str]:
    """Markdown: the in-process front, back and split compute at 1 and 2 torch threads."""
    front, back = split_compute.load_stages(layout, LocalFileKeyProvider.load(layout.kek), "minilm")
    activations = run_front(front, dict(inputs))
    arrays = {**activations, **{name: inputs[name] for name in front.manifest.forward_inputs}}
    lines = [f"| in-process, one request ({OPENMP_WAIT}) | 1 thread ms | 2 threads ms |"]
    lines.append("|---|---|---|")
    calls: dict[str, Callable[[], object]] = {
        "front (+ FP16 cast)": lambda: run_front(front, dict(inputs)),
        "back (forward only)": lambda: forward(back, assemble(back.manifest, [arrays])),
        "split (front then back)": lambda: split_compute.split_once(front, back, inputs),
    }
    for what, call in calls.items():
        cells = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            cells.append(f"{median_ms(call):.2f}")
        lines.append(f"| {what} | {' | '.join(cells)} |")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    extra = dict(item.split("=", 1) for item in args.env)
    with tempfile.TemporaryDirectory(prefix="lone-breakdown-") as folder:
        prepared = prepare(Path(folder), ["minilm"])
        layout = prepared.layout
        workload = minilm_workload(prepared, 1, args.seq)
        key = create_key(layout)
        private = start_private(
            layout.root,
            env={
                "SPLITVAULT_PRIVATE_TORCH_THREADS": str(args.threads),
                "SPLITVAULT_PRIVATE_DEBUG_PHASE_MARKS": "true",
                **{k: v for k, v in extra.items() if k.startswith("SPLITVAULT_PRIVATE_")},
            },
        )
        try:
            public = start_public(
                layout.root,
                private.port,
                env={
                    **PROTECTED_ENV,
                    "SPLITVAULT_PUBLIC_TORCH_THREADS": str(args.threads),
                    "SPLITVAULT_PUBLIC_DEBUG_PHASE_MARKS": "true",
                    **{k: v for k, v in extra.items() if k.startswith("SPLITVAULT_PUBLIC_")},
                },
            )
            try:
                lines = measure(public, private, key, layout, workload.bodies[0], args)
            finally:
                public.stop()
        finally:
            private.stop()
        inputs = {k: v.numpy() for k, v in workload.make_batch(1).items()}
        lines += ["", *in_process(layout, inputs)]
    print("\n".join(lines))
    return 0


def measure(
    public: TierProcess,
    private: TierProcess,
    key: str,
    layout: Any,
    body: bytes,
    args: argparse.Namespace,
) -> list[str]:
    """Accept the terms, warm up, send the measured requests; the step table."""
    import ssl

    base = f"https://localhost:{public.port}"
    verify = ssl.create_default_context(cafile=str(layout.public.ca_cert))
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=base, verify=verify, headers=headers) as client:
        version = client.get("/v1/terms").raise_for_status().json()["version"]
        client.post("/v1/terms/accept", json={"version": version}).raise_for_status()
    url = f"{base}/v2/models/minilm/infer"
    send_lone(url, headers, verify, body, args.warmup)
    timed = send_lone(url, headers, verify, body, args.requests)
    send_lone(url, headers, verify, body, 1)  # the private tier logs a call's marks at the next
    total = args.warmup + args.requests + 1
    public.wait_for_events("request_phases", count=total)
    private.wait_for_events("request_phases", count=total)
    merged = timelines(timed, phase_marks(public), phase_marks(private))
    if not merged:
        raise SystemExit("no request's marks could be matched")
    return lone_table(merged)


if __name__ == "__main__":
    raise SystemExit(main())
