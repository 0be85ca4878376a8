"""The activation monitor's Prometheus series (``private_core.activation_monitor``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Summary


class MonitorMetrics:
    """The monitor's series in the tier's registry (labels bounded by models and scopes)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.flagged = Counter(
            "splitvault_private_monitor_level_changes_total",
            "Activation streams reaching a level, by model, scope (identity or key) and level.",
            ["model", "scope", "level"],
            registry=registry,
        )
        self.refused = Counter(
            "splitvault_private_monitor_refused_total",
            "Requests refused by the activation monitor, by model and scope.",
            ["model", "scope"],
            registry=registry,
        )
        self.throttled = Counter(
            "splitvault_private_monitor_throttled_total",
            "Requests delayed by the activation monitor, by model and scope.",
            ["model", "scope"],
            registry=registry,
        )
        self.seconds = Summary(
            "splitvault_private_monitor_seconds",
            "Time the activation monitor spent per request.",
            ["model"],
            registry=registry,
        )
        self.cpu = Counter(
            "splitvault_private_monitor_cpu_seconds",
            "CPU time (of the thread that ran it) the activation monitor spent, by model.",
            ["model"],
            registry=registry,
        )
        self.profile = Gauge(
            "splitvault_private_monitor_profile",
            "1 when the model's activation profile is loaded, 0 when it runs without one.",
            ["model"],
            registry=registry,
        )
