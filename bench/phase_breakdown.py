"""Where a loaded splitvault request spends its time, from the tiers' own latency histograms:
each phase's p50 and p99 over one load window (the difference of two scrapes), interpolated
within a bucket, so a figure is only as fine as the buckets around it."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence

import httpx
from prometheus_client.parser import text_string_to_metric_families

# (metric, what it measures), in request order.
PHASES = (
    ("splitvault_request_seconds", "public: whole request (HTTP in to response out)"),
    ("splitvault_front_queue_wait_seconds", "public: queued until its front batch starts"),
    ("splitvault_front_seconds", "public: front stage (queue, batch and compute)"),
    ("splitvault_private_call_seconds", "public: private-tier round trip (gRPC, mTLS)"),
    ("splitvault_private_queue_wait_seconds", "private: queued until its batch starts"),
    ("splitvault_back_stage_seconds", "private: its batch (back stage and restriction)"),
)
Buckets = dict[float, float]  # upper bound -> cumulative count


def scrape(urls: Sequence[str], model: str) -> dict[str, Buckets]:
    """Each phase's cumulative buckets for ``model``, from the tiers' metrics listeners."""
    found: dict[str, Buckets] = {}
    wanted = {name for name, _ in PHASES}
    for url in urls:
        text = httpx.get(url, timeout=10).raise_for_status().text
        for family in text_string_to_metric_families(text):
            if family.name not in wanted:
                continue
            for sample in family.samples:
                if sample.name.endswith("_bucket") and sample.labels.get("model") == model:
                    bound = float(sample.labels["le"])
                    found.setdefault(family.name, {})[bound] = sample.value
    return found


def quantile(buckets: Buckets, q: float) -> float:
    """The q-quantile in seconds (linear within its bucket; NaN when empty)."""
    bounds = sorted(buckets)
    total = buckets[bounds[-1]] if bounds else 0.0
    if total <= 0:
        return math.nan
    rank, lower, below = q * total, 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower
            share = (rank - below) / (count - below) if count > below else 1.0
            return lower + share * (bound - lower)
        lower, below = bound, count
    return lower


def table(before: Mapping[str, Buckets], after: Mapping[str, Buckets]) -> list[str]:
    """Markdown: each phase's count, p50 and p99 over the window."""
    lines = ["| phase | observed | p50 ms | p99 ms |", "|---|---|---|---|"]
    for name, label in PHASES:
        window = {b: n - before.get(name, {}).get(b, 0.0) for b, n in after.get(name, {}).items()}
        count = max(window.values(), default=0.0)
        cells = [f"{quantile(window, q) * 1000:,.1f}" for q in (0.5, 0.99)]
        lines.append(f"| {label} | {count:,.0f} | {cells[0]} | {cells[1]} |")
    return lines


# --- A lone request (c=1), from the tiers' phase marks (shared/phases.py) ----------------------
Marks = list[tuple[str, int]]  # (phase ended, CLOCK_MONOTONIC ns), in order
# What the time between two successive marks is spent on; anything else is named by its marks.
STEPS = {
    ("client_sent", "public_in"): "client send, loopback, TLS, uvicorn HTTP parse, middlewares",
    ("public_in", "route_entered"): "body read, JSON decode + validation, auth, admission",
    ("route_entered", "decoded"): "tokenizer / tensor decode and checks",
    ("decoded", "limited"): "signature forwarding, rate limits",
    ("limited", "batch_dispatched"): "front batcher: queue, scheduler wake-up",
    ("batch_dispatched", "worker_started"): "hand-off to a worker thread",
    ("compute_done", "batch_returned"): "worker -> event loop wake-up",
    ("batch_returned", "front_returned"): "batcher result -> request task",
    ("front_returned", "activations_encoded"): "activation encode (tensor_codec)",
    ("activations_encoded", "private_in"): "gRPC + mTLS out, protobuf parse",
    ("private_in", "decoded_checked"): "private: decode, tensor checks",
    ("decoded_checked", "attributed"): "private: signature / nonce checks",
    ("attributed", "admitted"): "private: admission (budgets)",
    ("admitted", "batch_dispatched"): "private batcher: queue, scheduler wake-up",
    ("screened", "forward_done"): "back compute",
    ("forward_done", "compute_done"): "output restriction + watermark",
    ("batch_returned", "batch_resolved"): "batcher result -> request task",
    ("batch_resolved", "private_out"): "private: response encode",
    ("private_out", "private_replied"): "gRPC back, protobuf parse",
    ("private_replied", "response_built"): "output decode, v2 response built",
    ("response_built", "sealed"): "sealing the body",
    ("response_built", "monitor_observed"): "extraction monitor (public)",
    ("sealed", "monitor_observed"): "extraction monitor (public)",
    ("response_built", "audit_submitted"): "audit record prepared and submitted",
    ("monitor_observed", "audit_submitted"): "audit record prepared and submitted",
    ("audit_submitted", "audit_committed"): "audit commit wait",
    ("audit_committed", "response_encoded"): "response model, JSON encode",
    ("response_encoded", "public_out"): "response body sent",
    ("public_out", "client_received"): "loopback, TLS, client parse",
}


def merge(client: tuple[int, int], public: Marks, private: Marks) -> Marks:
    """One request's timeline: the client's send, the public marks with the private tier's
    spliced in after ``activations_encoded``, the client's receipt."""
    cut = next(i for i, (name, _) in enumerate(public) if name == "activations_encoded") + 1
    sent, received = ("client_sent", client[0]), ("client_received", client[1])
    return [sent, *public[:cut], *private, *public[cut:], received]


def label(before: str, after: str, private: bool = False) -> str:
    """What the step from ``before`` to ``after`` is spent on (``private``: in that tier)."""
    tier = "private" if private else "public"
    if after.startswith("compute_start_"):
        return f"{tier}: thread gate"
    if before.startswith("compute_start_"):
        threads = before.removeprefix("compute_start_").removesuffix("t")
        what = "monitor screen" if after == "screened" else "front compute + cast"
        return f"{what} ({threads} thread(s))"
    what = STEPS.get((before, after), f"{before} -> {after}")
    shared = ("batch_dispatched", "worker_started", "compute_done", "batch_returned")
    return f"{tier}: {what}" if before in shared and after in shared else what


def lone_table(timelines: Sequence[Marks]) -> list[str]:
    """Markdown: each step's median ms over the requests whose timelines have the most common
    steps (the thread counts chosen are steps too), then every thread choice's count and total."""
    shapes = Counter(tuple(name for name, _ in t) for t in timelines)
    shape = list(shapes.most_common(1)[0][0])
    same = [t for t in timelines if [name for name, _ in t] == shape]
    lines = ["| step (mark to mark) | median ms | p90 ms |", "|---|---|---|"]
    private = False
    for i in range(1, len(shape)):
        private = (private or shape[i - 1] == "private_in") and shape[i - 1] != "private_out"
        gaps = sorted((t[i][1] - t[i - 1][1]) / 1e6 for t in same)
        where = f"`{shape[i - 1]}` -> `{shape[i]}`"
        cells = f"{_at(gaps, 0.5):.2f} | {_at(gaps, 0.9):.2f}"
        lines.append(f"| {label(shape[i - 1], shape[i], private)} ({where}) | {cells} |")
    totals = sorted((t[-1][1] - t[0][1]) / 1e6 for t in same)
    lines.append(
        f"| **client-observed total** ({len(same)} of {len(timelines)} requests) | "
        f"**{_at(totals, 0.5):.2f}** | {_at(totals, 0.9):.2f} |"
    )
    lines += ["", "| threads (front + back) | requests | median total ms |", "|---|---|---|"]
    for steps, count in shapes.most_common():
        threads = [
            n.removeprefix("compute_start_") for n in steps if n.startswith("compute_start_")
        ]
        own = sorted(
            (t[-1][1] - t[0][1]) / 1e6 for t in timelines if tuple(n for n, _ in t) == steps
        )
        lines.append(f"| {' + '.join(threads)} | {count} | {_at(own, 0.5):.2f} |")
    return lines


def _at(values: Sequence[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))]
