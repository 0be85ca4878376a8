"""CPU an idle OpenMP team burns after a parallel region, per ``GOMP_SPINCOUNT``.

libgomp reads its environment once, when torch loads it, so each setting runs in a fresh
process: a two-thread torch op, then 50 ms of sleep in the calling thread; the process's CPU
time minus the calling thread's is what the team spent spinning before it slept (mean of
20). ``shared/openmp.py`` sets the serving tiers' spin count from this trade-off.

Run from the repository root:  .venv/bin/python bench/openmp_idle_spin.py [COUNT ...]
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
import subprocess

from shared.openmp import SPIN_COUNT, WAIT_POLICY

CHILD = """
import resource, statistics, time, torch
torch.set_num_threads(2)
x = torch.randn(4_000_000)
for _ in range(3):
    (x * 2).sum()
def process_cpu():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
spent = []
for _ in range(20):
    (x * 2).sum()
    before, own = process_cpu(), time.thread_time()
    time.sleep(0.05)
    spent.append((process_cpu() - before) - (time.thread_time() - own))
print(f"{1000 * statistics.mean(spent):.3f}")
"""


def idle_ms(count: str) -> float:
    """Mean ms of CPU the idle team burns after one region with ``GOMP_SPINCOUNT=count``."""
    env = {k: v for k, v in os.environ.items() if k not in (WAIT_POLICY, SPIN_COUNT)}
    if count != "default":
        env[SPIN_COUNT] = count
    out = subprocess.run(
        [sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True
    )
    return float(out.stdout.strip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "counts", nargs="*", default=["0", "10000", "100000", "default"], help="spin counts"
    )
    args = parser.parse_args()
    for count in args.counts:
        print(f"{SPIN_COUNT}={count}: {idle_ms(count):.3f} ms of CPU after a region", flush=True)


if __name__ == "__main__":
    main()
