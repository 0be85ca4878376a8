"""Build the tier's ``KeyGroups`` from its protection settings."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from public_api.monitor.cli import MONITOR_DB
from public_api.monitor.group_addresses import AddressBook, MemoryAddressBook, RedisAddressBook
from public_api.monitor.group_log import GroupLog
from public_api.monitor.groups import GroupConfig, KeyGroups
from public_api.monitor.monitor import ExtractionMonitor

if TYPE_CHECKING:
    from public_api.keys import KeyStore
    from public_api.metrics import PublicMetrics
    from public_api.protection_settings import ProtectionSettings


def build_groups(
    settings: ProtectionSettings,
    monitor: ExtractionMonitor,
    keys: KeyStore | None,
    metrics: PublicMetrics,
    state_dir: Path,
    redis_url: str | None,
) -> KeyGroups:
    """Key groups over ``monitor``'s store; addresses in Redis when ``redis_url`` is set."""
    book: AddressBook = (
        RedisAddressBook(redis_url, ttl_s=settings.group_window_s)
        if redis_url
        else MemoryAddressBook()
    )
    config = GroupConfig(
        interval_s=settings.group_interval_s,
        window_s=settings.group_window_s,
        crowd=settings.group_crowd,
    )

    def terms_addresses(key_id: str) -> list[str]:
        if keys is None:
            return []
        return [str(row["client_address"]) for row in keys.acceptances(key_id)]

    return KeyGroups(
        monitor,
        book,
        GroupLog(state_dir / MONITOR_DB),
        config=config,
        terms_addresses=terms_addresses,
        on_assessed=metrics.set_risk,
    )
