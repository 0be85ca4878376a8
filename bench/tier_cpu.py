"""Each tier's CPU per request under load: this tree's splitvault against another commit's.

Prepares the demo deployment as ``bench/serving_comparison.py`` does, starts ``splitvault`` and
``splitvault-base`` (the tree given by ``--base-tree``, e.g. ``git archive REV | tar -x -C
DIR``), and loads each in turn with the other stopped (SIGSTOP), in interleaved rounds that swap
the order. Per round and system it prints the throughput, the public and the private process's
CPU per answered request, and how the requests reached the private tier: how many went in
``InferBatch`` calls and how many per call (from the private tier's metrics; a tree without
``InferBatch`` shows none).

Run from the repository root, with the bench extra installed:
    .venv/bin/python bench/tier_cpu.py --model digits --concurrency 32 --rounds 4 --base-tree DIR
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
import re
import tempfile
from collections.abc import Sequence
from contextlib import ExitStack

import httpx

from bench import serving_comparison
from bench.loadgen import run_load
from bench.serving_systems import Endpoint, suspended, tree_cpu_seconds

SYSTEMS = ("splitvault", "splitvault-base")
BATCH_CALLS = re.compile(r"^splitvault_private_batch_call_requests_(count|sum) (\S+)$", re.M)


def batch_calls(endpoint: Endpoint) -> tuple[float, float]:
    """(InferBatch calls, requests in them) so far, from the private tier's metrics."""
    text = httpx.get(endpoint.metrics_urls[1], timeout=10).text
    found = dict(BATCH_CALLS.findall(text))
    return float(found.get("count", 0.0)), float(found.get("sum", 0.0))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("digits", "minilm"), default="digits")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--base-tree", type=Path, required=True)
    args = parser.parse_args(argv)
    options = serving_comparison.parse_args(
        [
            *("--models", args.model, "--systems", ",".join(SYSTEMS)),
            *("--base-tree", str(args.base_tree), "--duration", str(args.duration)),
            *("--warmup", "2"),
        ]
    )
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        workdir = Path(tmp)
        prepared = serving_comparison.prepare(workdir, [args.model])
        config = serving_comparison.server_config(prepared, workdir, options)
        endpoints, _ = serving_comparison.start_systems(config, prepared, options, stack)
        if args.model == "digits":
            workload = serving_comparison.digits_workload(prepared, options.batch)
        else:
            workload = serving_comparison.minilm_workload(prepared, options.batch, options.seq)
        for index in range(args.rounds):
            for name in SYSTEMS if index % 2 == 0 else SYSTEMS[::-1]:
                endpoint = endpoints[name]
                others = [pid for n, e in endpoints.items() if n != name for pid in e.pids]
                calls_before, in_calls_before = batch_calls(endpoint)
                spec = serving_comparison.load_spec(endpoint, workload, args.concurrency, options)
                with suspended(others):
                    public, private = ([tree_cpu_seconds([pid])] for pid in endpoint.pids)
                    result = asyncio.run(run_load(spec))
                    public.append(tree_cpu_seconds([endpoint.pids[0]]))
                    private.append(tree_cpu_seconds([endpoint.pids[1]]))
                calls, in_calls = batch_calls(endpoint)
                calls, in_calls = calls - calls_before, in_calls - in_calls_before
                answered = max(result.answered, 1)
                print(
                    f"round {index + 1} {name:16} {args.model} c={args.concurrency}: "
                    f"{result.throughput:7.1f} req/s, p50 {result.percentile(50):7.1f} ms, "
                    f"public {1000 * (public[1] - public[0]) / answered:6.2f} CPU ms/req, "
                    f"private {1000 * (private[1] - private[0]) / answered:6.2f} CPU ms/req; "
                    f"{in_calls:.0f} of {answered} requests in {calls:.0f} batch calls "
                    f"({in_calls / max(calls, 1):.1f} per call)",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
