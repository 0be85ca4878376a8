"""Settings that switch a protection of the public tier off, as the tier reports them.

Each is logged at start as an ``unsafe_setting`` warning, exported on the internal metrics
listener as ``splitvault_unsafe_setting{setting, value}`` and printed by ``splitvault health
public``. Only names and values: never a secret.
"""

from __future__ import annotations

from dataclasses import dataclass

from public_api.settings import PublicSettings


@dataclass(frozen=True)
class UnsafeSetting:
    """A setting, its value and what it turns off."""

    name: str
    value: str
    effect: str


def unsafe_settings(settings: PublicSettings) -> list[UnsafeSetting]:
    """The settings of ``settings`` that switch a protection off, in a fixed order."""
    protection = settings.protection
    found = [
        (
            settings.insecure_http,
            UnsafeSetting(
                "insecure_http", "true", "plain HTTP: safe only behind a TLS-terminating proxy"
            ),
        ),
        (
            not protection.require_api_key,
            UnsafeSetting(
                "protection.require_api_key",
                "false",
                "anyone may query: no API keys, terms, extraction monitor or per-key limits",
            ),
        ),
        (
            not protection.monitor_enabled,
            UnsafeSetting(
                "protection.monitor_enabled", "false", "no extraction monitor: nothing is scored"
            ),
        ),
        (
            protection.monitor_action == "record",
            UnsafeSetting(
                "protection.monitor_action",
                "record",
                "the extraction monitor only records: no key is alerted on, throttled or blocked",
            ),
        ),
        (
            protection.redis_fail_open,
            UnsafeSetting(
                "protection.redis_fail_open",
                "true",
                "while Redis is unreachable, requests are served without rate limits",
            ),
        ),
        (
            not protection.audit_enabled,
            UnsafeSetting("protection.audit_enabled", "false", "no audit trail is written"),
        ),
    ]
    return [setting for unsafe, setting in found if unsafe]
