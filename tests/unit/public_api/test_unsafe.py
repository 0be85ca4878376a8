"""Settings that switch protections off are named (finding 12); proxies are explicit (5)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from public_api.settings import PublicSettings
from public_api.unsafe import unsafe_settings


def _settings(**values: Any) -> PublicSettings:
    return PublicSettings(tier_dir=Path("/nonexistent"), private_addresses=["p:1"], **values)


def test_defaults_are_safe_and_trust_no_proxy() -> None:
    settings = _settings()
    assert unsafe_settings(settings) == []
    assert settings.trusted_proxies == []
    assert (settings.metrics_host, settings.metrics_port) == ("127.0.0.1", 9465)


def test_each_protection_switched_off_is_named() -> None:
    settings = _settings(
        insecure_http=True,
        protection={
            "require_api_key": False,
            "monitor_enabled": False,
            "monitor_action": "record",
            "redis_fail_open": True,
            "audit_enabled": False,
        },
    )
    assert [(s.name, s.value) for s in unsafe_settings(settings)] == [
        ("insecure_http", "true"),
        ("protection.require_api_key", "false"),
        ("protection.monitor_enabled", "false"),
        ("protection.monitor_action", "record"),
        ("protection.redis_fail_open", "true"),
        ("protection.audit_enabled", "false"),
    ]
    assert all(s.effect for s in unsafe_settings(settings))


def test_per_key_monitoring_without_groups_is_named() -> None:
    settings = _settings(protection={"groups_enabled": False})
    assert [(s.name, s.value) for s in unsafe_settings(settings)] == [
        ("protection.groups_enabled", "false")
    ]
    assert "many keys" in unsafe_settings(settings)[0].effect


@pytest.mark.parametrize("proxy", ["10.0.0.0/8", "192.0.2.1", "2001:db8::/48", "::1"])
def test_trusted_proxies_take_addresses_and_networks(proxy: str) -> None:
    assert _settings(trusted_proxies=[proxy]).trusted_proxies == [proxy]


@pytest.mark.parametrize("proxy", ["*", "proxy.example", "10.0.0.0/33"])
def test_trusted_proxies_refuse_wildcards_and_names(proxy: str) -> None:
    with pytest.raises(ValidationError, match="trusted proxy"):
        _settings(trusted_proxies=[proxy])
