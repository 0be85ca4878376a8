"""CPU of ``assemble`` (a batch's requests in one buffer of the stage's dtype), in process.

Batches of N single-row FP16 requests shaped as the digits demo's activations (16 x 8 x 8) cast
to the back stage's FP32, thread CPU per batch, quiet and with one pure-Python thread spinning
beside it (as the tier's event loop and gRPC threads hold the GIL beside its batch workers).
Compare two checkouts by running it from each (``--root``), alternating.

Run from the repository root:  .venv/bin/python bench/assemble_micro.py [--root DIR] [N ...]
"""

from __future__ import annotations

import argparse
import importlib
import sys
import threading
import time
from pathlib import Path
from types import ModuleType

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]


def load(root: Path) -> ModuleType:
    """``shared.batch_plan`` and ``shared.manifest`` from the tree at ``root``."""
    sys.path.insert(0, str(root))
    return importlib.import_module("shared.batch_plan")


def per_batch(plan: ModuleType, rows: int, repeats: int) -> float:
    """Microseconds of thread CPU per ``assemble`` of ``rows`` one-row requests."""
    manifest_module = importlib.import_module("shared.manifest")
    spec = manifest_module.TensorSpec(
        name="act",
        datatype="FP32",
        shape=[manifest_module.DimSpec(name="batch", min=1, max=64), 16, 8, 8],
    )
    manifest = manifest_module.StageManifest.model_construct(inputs=[spec])
    rng = np.random.default_rng(0)
    parts = [{"act": rng.standard_normal((1, 16, 8, 8)).astype(np.float16)} for _ in range(rows)]
    plan.assemble(manifest, parts)
    started = time.thread_time()
    for _ in range(repeats):
        plan.assemble(manifest, parts)
    return 1e6 * (time.thread_time() - started) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sizes", type=int, nargs="*", default=[1, 2, 8, 32])
    parser.add_argument("--root", type=Path, default=REPO_ROOT, help="source tree to measure")
    parser.add_argument("--repeats", type=int, default=300)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    plan = load(args.root.resolve())
    stop = threading.Event()

    def spin() -> None:
        count = 0
        while not stop.is_set():
            count += 1

    quiet = {size: per_batch(plan, size, args.repeats) for size in args.sizes}
    thread = threading.Thread(target=spin, daemon=True)
    thread.start()
    busy = {size: per_batch(plan, size, max(args.repeats // 3, 10)) for size in args.sizes}
    stop.set()
    for size in args.sizes:
        print(
            f"{size:>3} requests: {quiet[size]:7.1f} us quiet, {busy[size]:7.1f} us beside a spinning thread"
        )


if __name__ == "__main__":
    main()
