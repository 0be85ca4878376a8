"""The Grafana dashboard is valid and queries only metrics that the two tiers export."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from private_core.metrics import PrivateMetrics
from public_api.metrics import PublicMetrics

DASHBOARD = Path(__file__).resolve().parents[2] / "dashboards" / "grafana" / "splitvault.json"
ROWS = ["Traffic", "Limits", "Suspicious keys", "Private tier", "Audit"]
PROMQL_KEYWORDS = {"and", "or", "unless", "bool", "offset", "group_left", "group_right"}
SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_count", "_sum")}


def exported_names(registry: CollectorRegistry) -> dict[str, str]:
    """Every series name a registry exports (even before any label is set) -> its family."""
    names = {}
    for family in registry.collect():
        for suffix in SUFFIXES[family.type]:
            names[family.name + suffix] = family.name
    return names


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (strings, matchers, ranges, groupings dropped)."""
    bare = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    bare = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", bare)
    bare = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", bare)
    tokens = re.findall(r"(?<![\w.$])([A-Za-z_:][\w:]*)\b(?!\s*\()", bare)
    return {token for token in tokens if token not in PROMQL_KEYWORDS}


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


@pytest.fixture(scope="module")
def known() -> dict[str, str]:
    public = PublicMetrics.create(["digits"])
    private = PrivateMetrics.create(["digits"])
    return exported_names(public.registry) | exported_names(private.registry)


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def exprs(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in panels(dashboard) for t in p["targets"]]


def test_metric_name_extraction_ignores_labels_functions_and_groupings() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, model) (rate(a_bucket{model=~"$model", x!="y"}'
        "[$__rate_interval]))) / on (model) group_left sum without (code) (b_total offset 5m)"
    )
    assert metric_names(expr) == {"a_bucket", "b_total"}


def test_dashboard_is_an_importable_grafana_dashboard(dashboard: dict[str, Any]) -> None:
    assert dashboard["schemaVersion"] >= 39
    assert dashboard["uid"] == "splitvault" and dashboard["id"] is None
    inputs = {i["name"]: i for i in dashboard["__inputs"]}
    assert inputs["DS_PROMETHEUS"]["pluginId"] == "prometheus"
    assert panels(dashboard)
    for panel in panels(dashboard):
        assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_dashboard_has_the_rows_in_order(dashboard: dict[str, Any]) -> None:
    rows = [p["title"] for p in dashboard["panels"] if p["type"] == "row"]
    assert rows == ROWS
    per_row: dict[str, int] = {}
    current = ""
    for panel in dashboard["panels"]:
        current = panel["title"] if panel["type"] == "row" else current
        per_row[current] = per_row.get(current, 0) + (panel["type"] != "row")
    assert all(per_row[row] >= 1 for row in ROWS), per_row


def test_panels_fit_the_grid_without_overlapping(dashboard: dict[str, Any]) -> None:
    taken: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        cells = {
            (x, y)
            for x in range(pos["x"], pos["x"] + pos["w"])
            for y in range(pos["y"], pos["y"] + pos["h"])
        }
        assert not cells & taken, panel["title"]
        taken |= cells


def test_every_query_uses_only_metrics_the_tiers_export(
    dashboard: dict[str, Any], known: dict[str, str]
) -> None:
    for expr in exprs(dashboard):
        names = metric_names(expr)
        assert names, expr
        assert names <= set(known), (expr, names - set(known))
    for variable in dashboard["templating"]["list"]:
        (metric,) = re.findall(r"label_values\((\w+),", variable["definition"])
        assert metric in known


def test_every_exported_metric_is_on_the_dashboard(
    dashboard: dict[str, Any], known: dict[str, str]
) -> None:
    shown = {known[name] for expr in exprs(dashboard) for name in metric_names(expr)}
    assert shown == set(known.values())
