"""Latency of the two-tier path (SDK -> HTTPS -> public tier -> mTLS gRPC -> private tier)
against the unsplit model run in-process, for the digits CNN and MiniLM.

Run from the repository root:  .venv/bin/python bench/core_latency.py --requests 100 --rounds 3
"""

# ruff: noqa: E402 - the repository root goes on sys.path before the project imports.
from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import argparse
import os
import signal
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from types import FrameType
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from splitvault_client import Client

from shared.keys import LocalFileKeyProvider
from shared.layout import DeployLayout
from shared.manifest import RoundingPolicy, TopKPolicy
from splitvault.demo import digits, minilm
from splitvault.deploy import init_deployment
from splitvault.launcher import TierProcess, start_both
from splitvault.packing.pack import pack_spec
from splitvault.packing.spec import ModelSpec

TOP_K = 3
ACCURACY_IMAGES = 200
ACCURACY_CHUNK = 50  # under the packed max_batch_size (64)
SEQUENCE = 128

Call = Callable[[], object]


@dataclass(frozen=True)
class Workload:
    """One model: the in-process baseline call, the two-tier call and the answer check."""

    name: str
    baseline: Call
    two_tier: Call
    check: Callable[[], tuple[float, str]]  # (max abs difference, top-1 agreement)
    compared: str  # what the difference is measured on


@dataclass(frozen=True)
class Row:
    """One line of the result table."""

    model: str
    baseline: tuple[float, float]  # median, p90 (ms)
    two_tier: tuple[float, float]
    max_diff: float
    compared: str
    top1: str


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=200, help="requests per path per round")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--warmup", type=int, default=20, help="warm-up requests per path")
    parser.add_argument("--private-threads", type=int, default=1, help="private tier torch threads")
    parser.add_argument("--public-threads", type=int, default=1, help="public tier torch threads")
    parser.add_argument(
        "--baseline-threads",
        type=int,
        default=None,
        help="in-process torch threads (default: private + public)",
    )
    parser.add_argument("--skip-minilm", action="store_true", help="benchmark digits only")
    parser.add_argument("--out", type=Path, default=None, help="also write the table as markdown")
    args = parser.parse_args(argv)
    if min(args.requests, args.rounds, args.private_threads, args.public_threads) < 1:
        parser.error("--requests, --rounds and thread counts must be >= 1")
    if args.baseline_threads is None:
        args.baseline_threads = args.private_threads + args.public_threads
    return args


def pack_models(layout: DeployLayout, skip_minilm: bool) -> tuple[ModelSpec, ModelSpec | None]:
    """Train and pack digits (top-3); pack MiniLM (rounding) unless skipped."""
    provider = LocalFileKeyProvider.load(layout.kek)
    data = digits.load_data()
    digits_spec = ModelSpec(
        module=digits.train(data),
        example_inputs={"image": torch.from_numpy(data.test_x[:4])},
        task="classification",
        labels=digits.LABELS,
        max_sizes={"batch": 1024},
    )
    pack_spec(
        digits_spec,
        name="digits",
        split=digits.SPLIT,
        layout=layout,
        provider=provider,
        policy=TopKPolicy(k=TOP_K),
        show_progress=False,
    )
    if skip_minilm:
        return digits_spec, None
    minilm_spec = minilm.factory()
    pack_spec(
        minilm_spec,
        name="minilm",
        split=minilm.SPLIT,
        layout=layout,
        provider=provider,
        policy=RoundingPolicy(),
        show_progress=False,
    )
    return digits_spec, minilm_spec


def start_tiers(stack: ExitStack, layout: DeployLayout, args: argparse.Namespace) -> TierProcess:
    """Both tiers as subprocesses, stopped when ``stack`` closes; returns the public one."""
    env = {
        "SPLITVAULT_PRIVATE_TORCH_THREADS": str(args.private_threads),
        "SPLITVAULT_PUBLIC_TORCH_THREADS": str(args.public_threads),
    }
    return start_both(layout.root, stack, env=env)[0]


def digits_workload(spec: ModelSpec, client: Client) -> Workload:
    """Batch-1 image latency; top-3 scores and top-1 agreement on 200 test images."""
    data = digits.load_data()
    image = data.test_x[:1]
    tensor = torch.from_numpy(image)

    def baseline() -> object:
        with torch.inference_mode():
            return spec.module(tensor)

    def check() -> tuple[float, str]:
        images = data.test_x[:ACCURACY_IMAGES]
        with torch.inference_mode():
            logits = spec.module(torch.from_numpy(images)).double()
        scores, indices = torch.topk(torch.softmax(logits, dim=-1), TOP_K, dim=-1)
        got_scores: list[npt.NDArray[Any]] = []
        got_indices: list[npt.NDArray[Any]] = []
        for start in range(0, len(images), ACCURACY_CHUNK):
            prediction = client.predict("digits", images[start : start + ACCURACY_CHUNK])
            got_scores.append(_present(prediction.scores))
            got_indices.append(_present(prediction.indices))
        diff = np.abs(np.concatenate(got_scores) - scores.numpy()).max()
        agree = int((np.concatenate(got_indices)[:, 0] == indices.numpy()[:, 0]).sum())
        return float(diff), f"{agree}/{len(images)}"

    return Workload(
        "digits (1x1x8x8)",
        baseline,
        lambda: client.predict("digits", image),
        check,
        f"top-{TOP_K} scores",
    )


def minilm_workload(spec: ModelSpec, client: Client) -> Workload:
    """One sentence padded to 128 tokens; embedding difference on the demo sentences."""
    inputs = minilm.tokenize(minilm.SENTENCES[:1], length=SEQUENCE)
    arrays: dict[str, Any] = {name: tensor.numpy() for name, tensor in inputs.items()}

    def baseline() -> object:
        with torch.inference_mode():
            return spec.module(**inputs)

    def check() -> tuple[float, str]:
        batch = minilm.tokenize(minilm.SENTENCES, length=SEQUENCE)
        with torch.inference_mode():
            expected = spec.module(**batch).numpy()
        remote = {name: tensor.numpy() for name, tensor in batch.items()}
        got = _present(client.predict("minilm", remote).embeddings)
        return float(np.abs(got - expected).max()), "n/a"

    return Workload(
        f"minilm (1x{SEQUENCE} tokens)",
        baseline,
        lambda: client.predict("minilm", arrays),
        check,
        "embeddings",
    )


def _present(array: npt.NDArray[Any] | None) -> npt.NDArray[Any]:
    if array is None:
        raise RuntimeError("the server's answer lacks a field the model's policy should fill")
    return array


def time_calls(call: Call, count: int) -> list[float]:
    """Run ``call`` ``count`` times in sequence; per-call wall time in milliseconds."""
    times: list[float] = []
    for _ in range(count):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1000.0)
    return times


def measure(workload: Workload, args: argparse.Namespace) -> Row:
    """Warm up both paths, then alternate rounds of each (order flipped every round)."""
    time_calls(workload.baseline, args.warmup)
    time_calls(workload.two_tier, args.warmup)
    base: list[float] = []
    split: list[float] = []
    for round_index in range(args.rounds):
        order = [(workload.baseline, base), (workload.two_tier, split)]
        for call, sink in order if round_index % 2 == 0 else reversed(order):
            sink.extend(time_calls(call, args.requests))
    max_diff, top1 = workload.check()
    return Row(workload.name, _summary(base), _summary(split), max_diff, workload.compared, top1)


def _summary(times: list[float]) -> tuple[float, float]:
    return float(np.median(times)), float(np.percentile(times, 90))


HEADERS = (
    "model",
    "baseline p50 ms",
    "baseline p90 ms",
    "two-tier p50 ms",
    "two-tier p90 ms",
    "ratio p50",
    "ratio p90",
    "max abs diff",
    "top-1 agree",
)


def table_cells(rows: Sequence[Row]) -> list[list[str]]:
    """Formatted cells, one list per row."""
    return [
        [
            row.model,
            f"{row.baseline[0]:.2f}",
            f"{row.baseline[1]:.2f}",
            f"{row.two_tier[0]:.2f}",
            f"{row.two_tier[1]:.2f}",
            f"{row.two_tier[0] / row.baseline[0]:.1f}x",
            f"{row.two_tier[1] / row.baseline[1]:.1f}x",
            f"{row.max_diff:.2e} ({row.compared})",
            row.top1,
        ]
        for row in rows
    ]


def render_plain(rows: Sequence[Row]) -> str:
    """An aligned text table."""
    cells = [list(HEADERS), *table_cells(rows)]
    widths = [max(len(line[i]) for line in cells) for i in range(len(HEADERS))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True))
        for line in cells
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(line.rstrip() for line in lines)


def render_markdown(rows: Sequence[Row]) -> str:
    """A GitHub-flavoured markdown table."""
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(line) + " |" for line in table_cells(rows)]
    return "\n".join(lines)


def describe(args: argparse.Namespace) -> str:
    """The conditions the numbers were taken under."""
    return (
        f"{args.rounds} interleaved rounds x {args.requests} sequential requests per path "
        f"(after {args.warmup} warm-up); torch threads: private {args.private_threads}, "
        f"public {args.public_threads}, baseline {args.baseline_threads}; "
        f"{os.cpu_count()} CPUs, torch {torch.__version__}"
    )


def run(args: argparse.Namespace) -> list[Row]:
    """Pack, start the tiers, measure every workload; everything is undone on exit."""
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sv-bench-")))
        layout = init_deployment(workdir / "deploy")
        _progress("packing models")
        digits_spec, minilm_spec = pack_models(layout, args.skip_minilm)
        _progress("starting tiers")
        public = start_tiers(stack, layout, args)
        url = f"https://localhost:{public.port}"
        client = stack.enter_context(Client(url, ca=layout.public.ca_cert))
        workloads = [digits_workload(digits_spec, client)]
        if minilm_spec is not None:
            workloads.append(minilm_workload(minilm_spec, client))
        rows: list[Row] = []
        for workload in workloads:
            _progress(f"measuring {workload.name}")
            rows.append(measure(workload, args))
        _progress("stopping tiers")
        return rows


def _progress(step: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {step} ...", file=sys.stderr, flush=True)


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print the table and optionally write it as markdown."""
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.baseline_threads)
    signal.signal(signal.SIGTERM, _raise_interrupt)  # clean up on SIGTERM as on Ctrl-C
    try:
        rows = run(args)
    except KeyboardInterrupt:
        print("interrupted; tiers stopped and temporary folder removed", file=sys.stderr)
        return 130
    conditions = describe(args)
    print(conditions)
    print(render_plain(rows))
    if args.out is not None:
        title = "# Two-tier latency vs unsplit model (in-process)\n\n"
        args.out.write_text(f"{title}{conditions}\n\n{render_markdown(rows)}\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
