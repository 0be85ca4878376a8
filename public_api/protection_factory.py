"""Build the protection gate from settings: the embedded defaults or Redis-backed stores."""

from __future__ import annotations

from collections.abc import Mapping

from public_api.front import FrontStage
from public_api.key_cache import KeyCache
from public_api.keys import KeyStore
from public_api.metrics import PublicMetrics
from public_api.monitor import (
    ExtractionMonitor,
    MemoryMonitorStore,
    MonitorConfig,
    MonitorStore,
    RedisMonitorStore,
    ReferenceProfile,
    SqliteAssessmentLog,
    load_profile,
)
from public_api.monitor.cli import MONITOR_DB
from public_api.monitor.decisions import KeyStoreDecisions
from public_api.monitor.groups import KeyGroups
from public_api.monitor.groups_factory import build_groups
from public_api.protection import Protection
from public_api.ratelimit import MemoryRateLimiter, RateLimiter, RedisRateLimiter
from public_api.sealing import OWNER_PUBLIC_KEY, terms_clause
from public_api.settings import PublicSettings
from public_api.state_backend import StateStores, open_state
from public_api.terms import Terms, load_terms, with_clause
from shared.layout import REFERENCE_FILE, TierDir


def build_protection(
    settings: PublicSettings,
    stages: Mapping[str, FrontStage],
    metrics: PublicMetrics,
    state: StateStores | None = None,
) -> Protection:
    """The gate for this tier: keys and audit in ``state`` (default: ``open_state``), the
    monitor's log in ``settings.state_dir``, limits in memory or Redis."""
    config = settings.protection
    state = state if state is not None else open_state(settings)
    keys = state.keys
    monitor = _monitor(settings, stages, keys)
    groups: KeyGroups | None = None
    if monitor is not None and config.groups_enabled:
        redis_url = _redis_url(settings) if config.rate_limit_backend == "redis" else None
        groups = build_groups(config, monitor, keys, metrics, settings.state_dir, redis_url)
    return Protection(
        config,
        keys=keys,
        terms=_terms(settings),
        limiter=_limiter(settings),
        monitor=monitor,
        audit=state.audit,
        metrics=metrics,
        key_cache=KeyCache(ttl_s=config.key_cache_s),
        groups=groups,
    )


def _terms(settings: PublicSettings) -> Terms:
    if not settings.terms_file.is_file():
        raise ValueError(
            f"no terms of service at {settings.terms_file}: write them there "
            "(splitvault init creates a placeholder) and set protection.terms_version"
        )
    terms = load_terms(settings.terms_file, settings.protection.terms_version)
    if settings.sealing.enabled and (settings.tier_dir / OWNER_PUBLIC_KEY).is_file():
        return with_clause(terms, terms_clause(settings.sealing))  # what is kept, and how long
    return terms


def _redis_url(settings: PublicSettings) -> str:
    if not settings.protection.redis_url:
        raise ValueError(
            "protection.rate_limit_backend is 'redis' but protection.redis_url is unset"
        )
    return settings.protection.redis_url


def _limiter(settings: PublicSettings) -> RateLimiter:
    if settings.protection.rate_limit_backend == "redis":
        return RedisRateLimiter(_redis_url(settings), fail_open=settings.protection.redis_fail_open)
    return MemoryRateLimiter()


def _monitor(
    settings: PublicSettings, stages: Mapping[str, FrontStage], keys: KeyStore | None
) -> ExtractionMonitor | None:
    config = settings.protection
    if not config.monitor_enabled or keys is None:
        return None
    profiles: dict[str, ReferenceProfile] = {}
    tier = TierDir(settings.tier_dir)
    for name in stages:
        path = tier.model(name) / REFERENCE_FILE
        if path.is_file():
            profiles[name] = load_profile(path)
    store: MonitorStore = (
        RedisMonitorStore(_redis_url(settings))
        if config.rate_limit_backend == "redis"
        else MemoryMonitorStore()
    )
    log = SqliteAssessmentLog(settings.state_dir / MONITOR_DB)
    return ExtractionMonitor(
        MonitorConfig(action=config.monitor_action),
        profiles,
        store,
        log,
        decisions=KeyStoreDecisions(keys),  # throttles and blocks outlive the store's state
    )
