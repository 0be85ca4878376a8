"""Extraction monitoring: per-key risk scores from PRADA and natural-data signals."""

from public_api.monitor.config import Action, MonitorConfig
from public_api.monitor.decisions import DecisionStore, KeyStoreDecisions
from public_api.monitor.monitor import ExtractionMonitor
from public_api.monitor.profile import (
    ReferenceProfile,
    build_profile,
    features_of,
    load_profile,
    save_profile,
)
from public_api.monitor.store import (
    Assessment,
    Level,
    MemoryMonitorStore,
    MonitorStore,
    RedisMonitorStore,
    SqliteAssessmentLog,
    UnreadableState,
    Versioned,
    read_assessments,
)

__all__ = [
    "Action",
    "Assessment",
    "DecisionStore",
    "ExtractionMonitor",
    "KeyStoreDecisions",
    "Level",
    "MemoryMonitorStore",
    "MonitorConfig",
    "MonitorStore",
    "RedisMonitorStore",
    "ReferenceProfile",
    "SqliteAssessmentLog",
    "UnreadableState",
    "Versioned",
    "build_profile",
    "features_of",
    "load_profile",
    "read_assessments",
    "save_profile",
]
