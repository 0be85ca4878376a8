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


EFFECTS = {
    "insecure_http": "plain HTTP: safe only behind a TLS-terminating proxy",
    "protection.require_api_key": (
        "anyone may query: no API keys, terms, extraction monitor or per-key limits"
    ),
    "protection.monitor_enabled": "no extraction monitor: nothing is scored",
    "protection.monitor_action": (
        "the extraction monitor only records: no key is alerted on, throttled or blocked"
    ),
    "protection.groups_enabled": (
        "keys are judged one by one: a thief who spreads queries over many keys is not grouped"
    ),
    "protection.redis_fail_open": (
        "while Redis is unreachable, requests are served without rate limits"
    ),
    "protection.audit_enabled": "no audit trail is written",
    "protection.audit_anchor.enabled": (
        "the audit trail is not anchored in the private ledger: whoever controls the public "
        "host can rewrite it undetected"
    ),
    "sealing.enabled": "served request bodies are not sealed for the owner's ownership proofs",
}


def unsafe_settings(settings: PublicSettings) -> list[UnsafeSetting]:
    """The settings of ``settings`` that switch a protection off, in ``EFFECTS`` order."""
    protection = settings.protection
    values = {
        "insecure_http": "true" if settings.insecure_http else None,
        "protection.require_api_key": None if protection.require_api_key else "false",
        "protection.monitor_enabled": None if protection.monitor_enabled else "false",
        "protection.monitor_action": "record" if protection.monitor_action == "record" else None,
        "protection.groups_enabled": (
            "false" if protection.monitor_enabled and not protection.groups_enabled else None
        ),
        "protection.redis_fail_open": "true" if protection.redis_fail_open else None,
        "protection.audit_enabled": None if protection.audit_enabled else "false",
        "protection.audit_anchor.enabled": (
            "false" if protection.audit_enabled and not protection.audit_anchor.enabled else None
        ),
        "sealing.enabled": None if settings.sealing.enabled else "false",
    }
    return [
        UnsafeSetting(name, value, EFFECTS[name])
        for name in EFFECTS
        if (value := values[name]) is not None
    ]
