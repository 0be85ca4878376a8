"""What torch.export's per-call input check costs a served stage (``shared/exported.py``).

Times each stage of a packed deployment's models on one row, in-process on one torch thread,
with the check (``ExportedProgram.module()``) and without it (``serving_module``), the two
interleaved in every round; prints each variant's median microseconds per call and the median
of the per-round ratios with their spread.

Run from the repository root:
  .venv/bin/python bench/export_check_micro.py --deploy DEPLOY [--models digits,minilm]
"""

# ruff: noqa: E402 - the repository root goes on sys.path before the project imports.
from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import argparse
import io
import statistics
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch

from public_api.front import probe_inputs
from shared.crypto import decrypt_bytes
from shared.exported import serving_module
from shared.keys import LocalFileKeyProvider
from shared.layout import DeployLayout
from shared.manifest import read_manifest


def programs(layout: DeployLayout, model: str) -> dict[str, tuple[Any, list[torch.Tensor]]]:
    """Each stage of ``model``: its exported program and one row of valid inputs."""
    provider = LocalFileKeyProvider.load(layout.kek)
    found = {}
    for stage, folder in (
        ("front", layout.public.model(model)),
        ("back", layout.private.model(model)),
    ):
        manifest = read_manifest(folder)
        data = (folder / manifest.file).read_bytes()
        if manifest.encrypted:
            data = decrypt_bytes(data, provider)
        inputs = probe_inputs(manifest)
        found[stage] = (
            torch.export.load(io.BytesIO(data)),
            [torch.from_numpy(inputs[spec.name]) for spec in manifest.inputs],
        )
    return found


def per_call_us(call: Callable[[], Any], calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        call()
    return (time.perf_counter() - started) / calls * 1e6


def measure(program: Any, args: list[torch.Tensor], rounds: int, calls: int) -> list[str]:
    """One line per variant and the ratio line, over interleaved rounds."""
    checked, served = program.module(), serving_module(program)
    times: dict[str, list[float]] = {"checked": [], "served": []}
    with torch.inference_mode():
        for module in (checked, served):
            for _ in range(max(3, calls // 10)):
                module(*args)
        for index in range(rounds):
            order = (("checked", checked), ("served", served))
            for name, module in order if index % 2 == 0 else reversed(order):
                times[name].append(per_call_us(partial(module, *args), calls))
    ratios = sorted(s / c for s, c in zip(times["served"], times["checked"], strict=True))
    return [
        f"with torch's check {statistics.median(times['checked']):,.1f} us, "
        f"without {statistics.median(times['served']):,.1f} us; "
        f"ratio {statistics.median(ratios):.2f}x ({ratios[0]:.2f}-{ratios[-1]:.2f}, {rounds} rounds)"
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--deploy", type=Path, required=True)
    parser.add_argument("--models", default="digits,minilm")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--calls", type=int, default=200, help="calls per round (MiniLM: /20)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    layout = DeployLayout(args.deploy)
    for model in args.models.split(","):
        for stage, (program, inputs) in programs(layout, model).items():
            calls = args.calls if model != "minilm" else max(5, args.calls // 20)
            for line in measure(program, inputs, args.rounds, calls):
                print(f"{model} {stage}: {line}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
