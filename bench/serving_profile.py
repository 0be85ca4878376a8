"""Profile splitvault's tiers under load with py-spy and summarise where the time goes."""

from __future__ import annotations

import asyncio
import re
import shutil
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from bench.loadgen import LoadResult, LoadSpec, run_load
from bench.serving_systems import tree_cpu_seconds

_FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")
_PACKAGES = ("public_api", "private_core", "shared", "protos", "splitvault")
_ENTRY_POINTS = ("(splitvault/cli.py)", "(splitvault/__main__.py)", "(public_api/server.py)")
_MARKERS = ("site-packages/", "lib/python3", "/work/main/")


@dataclass(frozen=True)
class Profile:
    """Collapsed stacks of one process and its CPU use during the profiled window."""

    name: str
    stacks: Path
    cpu_seconds: float


def py_spy() -> str | None:
    """The py-spy executable (next to this Python, or on PATH)."""
    local = Path(sys.executable).with_name("py-spy")
    return str(local) if local.exists() else shutil.which("py-spy")


async def profile_load(
    spec: LoadSpec, processes: dict[str, int], folder: Path
) -> tuple[LoadResult, list[Profile]]:
    """Run ``spec`` and sample each process with py-spy during its measured window."""
    executable = py_spy()
    if executable is None:
        raise RuntimeError("py-spy is not installed: pip install py-spy")
    folder.mkdir(parents=True, exist_ok=True)
    load = asyncio.create_task(run_load(spec))
    await asyncio.sleep(spec.warmup_s)
    before = {name: tree_cpu_seconds([pid]) for name, pid in processes.items()}
    spies = {}
    for name, pid in processes.items():
        spies[name] = await asyncio.create_subprocess_exec(
            executable, "record", "--pid", str(pid), "--duration", str(max(1, int(spec.duration_s))),
            "--rate", "100", "--format", "raw", "--nonblocking", "--gil", "--output",
            str(folder / f"{name}.txt"),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
    result = await load
    await asyncio.gather(*(spy.wait() for spy in spies.values()))
    profiles = [
        Profile(name, folder / f"{name}.txt", tree_cpu_seconds([pid]) - before[name])
        for name, pid in processes.items()
    ]
    return result, profiles


def _short(frame: str) -> str:
    match = _FRAME.match(frame)
    if match is None:
        return frame
    path = match["file"]
    for marker in _MARKERS:
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{match['function']} ({path})".replace("|", "/")


def read_stacks(path: Path) -> tuple[Counter[str], Counter[str], int]:
    """Inclusive and self sample counts per frame, and the total, from py-spy's raw output."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [_short(frame) for frame in stack.split(";")]
        samples = int(count)
        total += samples
        own[frames[-1]] += samples
        for frame in set(frames):
            inclusive[frame] += samples
    return inclusive, own, total


def summarise(profiles: list[Profile], answered: int, top: int = 12) -> list[str]:
    """Markdown: CPU per request of each process, then its hottest frames."""
    lines = []
    for profile in profiles:
        if not profile.stacks.exists():
            lines += [f"#### {profile.name}: no samples (py-spy failed)", ""]
            continue
        inclusive, own, total = read_stacks(profile.stacks)
        per_request = profile.cpu_seconds * 1000 / answered if answered else float("nan")
        lines += [
            f"#### {profile.name}: {profile.cpu_seconds:.1f} CPU s in the window, "
            f"{per_request:.2f} CPU ms per answered request, {total} samples",
            "",
            "| inclusive | splitvault frame | | self | frame on top of the stack |",
            "|---|---|---|---|---|",
        ]
        hot = [(f, n) for f, n in inclusive.most_common() if _ours(f)][:top]
        leaves = own.most_common(top)
        for index in range(max(len(hot), len(leaves))):
            left = hot[index] if index < len(hot) else ("", 0)
            right = leaves[index] if index < len(leaves) else ("", 0)
            lines.append(
                f"| {_pct(left[1], total)} | {left[0]} | | {_pct(right[1], total)} | {right[0]} |"
            )
        lines.append("")
    return lines


def _ours(frame: str) -> bool:
    """A splitvault frame, leaving out the entry points (on every stack of their thread)."""
    if any(entry in frame for entry in _ENTRY_POINTS):
        return False
    return any(f"({package}/" in frame for package in _PACKAGES)


def _pct(count: int, total: int) -> str:
    return f"{count / total:.0%}" if total and count else ""


# Hops of a request, each with fragments of its frames ("function (path:line)"). A sample counts
# for the first hop matched walking its stack from the top (the innermost frame) down; the
# generic hops (the last, GLUE) only when no other hop is on the stack, so that a thread
# hand-off counts for the hop that made it and a middleware for what it calls.
Hops = tuple[tuple[str, tuple[str, ...]], ...]
GLUE = "event loop (with gRPC's callbacks), threads, middleware"
PUBLIC_HOPS: Hops = (
    ("front stage (compute, batching)", ("public_api/front", "compute_threads.py", "torch/")),
    ("private call (gRPC + mTLS client)", ("private_client.py", "grpc/", "google/protobuf")),
    ("sealed bodies", ("public_api/sealing", "public_api/sealed_store")),
    ("audit trail", ("public_api/audit", "public_api/pg_audit", "sqlite3", "Protection._audit")),
    ("monitor", ("public_api/monitor/",)),
    ("request signatures", ("public_api/signing", "shared/signatures")),
    ("rate limits", ("public_api/ratelimit/", "shared/gcra")),
    ("API key and terms", ("public_api/admission", "public_api/key", "public_api/terms")),
    ("metrics", ("prometheus_client", "Metrics.observe", "RequestMetrics.__call__.<locals>.")),
    ("request handling (JSON, checks, answer)", ("json/", "pydantic", "public_api/body",
                                                 "public_api/v2", "shared/tensor_codec",
                                                 "shared/validation", "public_api/service",
                                                 "public_api/routes", "public_api/pipeline",
                                                 "public_api/protection")),
    ("FastAPI routing and dependencies", ("fastapi/",)),
    ("HTTP parse and TLS (uvicorn, h11, ssl)", ("h11", "uvicorn/", "ssl", "starlette/",
                                                "public_api/connection")),
    (GLUE, ("asyncio/", "concurrent/", "threading", "public_api/", "shared/")),
)  # fmt: skip
PRIVATE_HOPS: Hops = (
    ("restriction (policy, watermark)", ("private_core/policy", "private_core/watermark/")),
    ("activation monitor", ("private_core/activation_",)),
    ("request signatures", ("private_core/attribution", "private_core/signers", "shared/signat")),
    ("admission (budgets, nonces)", ("private_core/admission", "private_core/budgets")),
    ("ledger", ("private_core/ledger",)),
    ("back stage", ("private_core/runner.py (run_batch", "run_batch (", "forward (",
                    "compute_threads.py", "torch/", "private_core/model")),
    ("batcher", ("shared/batcher",)),
    ("decode and checks", ("shared/tensor_codec", "shared/validation", "private_core/runner")),
    ("metrics", ("prometheus_client", "private_core/metrics")),
    ("gRPC + mTLS server", ("grpc/", "private_core/auth", "private_core/servicer", "protobuf")),
    (GLUE, ("asyncio/", "concurrent/", "threading", "private_core/", "shared/")),
)  # fmt: skip


def hop_samples(path: Path, hops: Hops) -> Counter[str]:
    """Samples per hop ("other": no hop matched), from py-spy's raw output."""
    found: Counter[str] = Counter()
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        found[_hop(frames, hops[:-1]) or _hop(frames, hops[-1:]) or "other"] += int(count)
    return found


def _hop(frames: list[str], hops: Hops) -> str | None:
    for frame in reversed(frames):
        for name, fragments in hops:
            if any(fragment in frame for fragment in fragments):
                return name
    return None


def hop_table(profiles: list[Profile], answered: int) -> list[str]:
    """Markdown: each tier's CPU ms per answered request, split by hop in sample shares."""
    lines = []
    for profile in profiles:
        if not profile.stacks.exists():
            continue
        hops = PUBLIC_HOPS if profile.name.startswith("public") else PRIVATE_HOPS
        samples = hop_samples(profile.stacks, hops)
        total = sum(samples.values())
        per_request = profile.cpu_seconds * 1000 / answered if answered and total else 0.0
        lines += [
            f"#### {profile.name}: {per_request:.2f} CPU ms per answered request by hop",
            "",
            "| hop | share of samples | ~CPU ms per request |",
            "|---|---|---|",
        ]
        for name, count in samples.most_common():
            share = count / total
            lines.append(f"| {name} | {share:.0%} | {share * per_request:.2f} |")
        lines.append("")
    return lines
