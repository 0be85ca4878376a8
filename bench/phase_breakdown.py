"""Where a loaded splitvault request spends its time, from the tiers' own latency histograms:
each phase's p50 and p99 over one load window (the difference of two scrapes), interpolated
within a bucket, so a figure is only as fine as the buckets around it."""

from __future__ import annotations

import math
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
