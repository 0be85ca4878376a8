"""The evidence report's timeline as inline SVG: no scripts, no fonts or images fetched.

Three panels over the same hours: requests and samples answered to the key, the extraction
monitor's highest score, and the watermarked answers served. Over more than ``MAX_BARS``
hours the buckets become days.
"""

from __future__ import annotations

import datetime as dt
import html
from collections.abc import Sequence
from typing import Any

WIDTH, PANEL, GAP, LEFT, RIGHT = 900, 90, 34, 70, 20
MAX_BARS = 240
SAMPLES_COLOUR, REQUESTS_COLOUR = "#1f77b4", "#222222"
SCORE_COLOUR, MARKED_COLOUR = "#d62728", "#2ca02c"


def _buckets(
    timeline: Sequence[dict[str, Any]], marked: Sequence[dict[str, int]]
) -> tuple[int, list[dict[str, float]]]:
    """(bucket seconds, one row per bucket from the first to the last hour, gaps as zeros)."""
    hours = [int(b["hour"]) for b in timeline] + [int(m["hour"]) for m in marked]
    first, last = min(hours), max(hours)
    size = 3600 if (last - first) // 3600 < MAX_BARS else 86400
    start = first - first % size
    rows = [
        {"start": float(t), "requests": 0.0, "samples": 0.0, "score": 0.0, "marked": 0.0}
        for t in range(start, last + 1, size)
    ]
    for bucket in timeline:
        row = rows[(int(bucket["hour"]) - start) // size]
        row["requests"] += bucket["requests"]
        row["samples"] += bucket["samples"]
        row["score"] = max(row["score"], float(bucket["max_score"]))
    for item in marked:
        rows[(int(item["hour"]) - start) // size]["marked"] += item["marked"]
    return size, rows


def _label(epoch: float, size: int) -> str:
    moment = dt.datetime.fromtimestamp(epoch, dt.UTC)
    return moment.strftime("%Y-%m-%d %H:00Z" if size == 3600 else "%Y-%m-%d")


def _text(x: float, y: float, value: str, anchor: str = "start", size: int = 11) -> str:
    return (
        f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" '
        f'font-family="sans-serif">{html.escape(value)}</text>'
    )


def _panel(
    top: float, title: str, rows: list[dict[str, float]], field: str, colour: str, top_value: float
) -> list[str]:
    """One panel of bars (``field``) with its title, frame and scale."""
    inner = WIDTH - LEFT - RIGHT
    step = inner / len(rows)
    parts = [
        _text(LEFT, top - 6, title, size=12),
        f'<rect x="{LEFT}" y="{top}" width="{inner}" height="{PANEL}" fill="none" '
        'stroke="#999999"/>',
        _text(LEFT - 6, top + 10, f"{top_value:g}", "end"),
        _text(LEFT - 6, top + PANEL, "0", "end"),
    ]
    for i, row in enumerate(rows):
        height = PANEL * row[field] / top_value if top_value else 0.0
        if height > 0:
            parts.append(
                f'<rect x="{LEFT + i * step + step * 0.1:.1f}" y="{top + PANEL - height:.1f}" '
                f'width="{max(step * 0.8, 1.0):.1f}" height="{height:.1f}" fill="{colour}"/>'
            )
    return parts


def _line(top: float, rows: list[dict[str, float]], field: str, top_value: float) -> str:
    inner = WIDTH - LEFT - RIGHT
    step = inner / len(rows)
    points = " ".join(
        f"{LEFT + (i + 0.5) * step:.1f},{top + PANEL - PANEL * row[field] / top_value:.1f}"
        for i, row in enumerate(rows)
    )
    return (
        f'<polyline points="{points}" fill="none" stroke="{REQUESTS_COLOUR}" stroke-width="1.5"/>'
    )


def timeline_svg(
    timeline: Sequence[dict[str, Any]], marked: Sequence[dict[str, int]], flag_threshold: float
) -> str:
    """The whole chart (an empty note when there is nothing to draw)."""
    if not timeline and not marked:
        return "<p>No requests or watermarked answers to chart.</p>"
    size, rows = _buckets(timeline, marked)
    unit = "hour" if size == 3600 else "day"
    most_samples = max(max(r["samples"] for r in rows), max(r["requests"] for r in rows), 1.0)
    tops = [30.0 + i * (PANEL + GAP) for i in range(3)]
    parts = _panel(
        tops[0],
        f"Samples answered per {unit} (bars) and requests (line)",
        rows,
        "samples",
        SAMPLES_COLOUR,
        most_samples,
    )
    parts.append(_line(tops[0], rows, "requests", most_samples))
    parts += _panel(
        tops[1], f"Extraction monitor: highest score per {unit}", rows, "score", SCORE_COLOUR, 1.0
    )
    y = tops[1] + PANEL * (1 - flag_threshold)
    parts.append(
        f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y:.1f}" y2="{y:.1f}" stroke="{SCORE_COLOUR}" '
        'stroke-dasharray="4 3"/>'
    )
    most_marked = max(max(r["marked"] for r in rows), 1.0)
    parts += _panel(
        tops[2], f"Watermarked answers per {unit}", rows, "marked", MARKED_COLOUR, most_marked
    )
    bottom = tops[2] + PANEL + 16
    parts.append(_text(LEFT, bottom, _label(rows[0]["start"], size)))
    parts.append(_text(WIDTH - RIGHT, bottom, _label(rows[-1]["start"], size), "end"))
    height = bottom + 10
    return (
        f'<svg width="{WIDTH}" height="{height:.0f}" '
        f'viewBox="0 0 {WIDTH} {height:.0f}" role="img" aria-label="timeline">'
        + "".join(parts)
        + "</svg>"
    )
