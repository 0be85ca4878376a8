"""``TierSettings.load`` overrides, as both tiers' settings read them: ``None`` given is a value
(it switches an optional feature off), ``UNSET`` or no keyword is not given."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from private_core.settings import PrivateSettings
from public_api.settings import PublicSettings
from shared.settings import UNSET, given


@pytest.fixture
def private_toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in ("METRICS_PORT", "LONE_REQUEST_THREADS", "PORT"):
        monkeypatch.delenv(f"SPLITVAULT_PRIVATE_{name}", raising=False)
    config = tmp_path / "private.toml"
    config.write_text("metrics_port = 9999\nlone_request_threads = 3\nport = 6000\n")
    return config


@pytest.fixture
def public_toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in ("METRICS_PORT", "GRPC_PORT", "PORT", "PRIVATE_ADDRESSES"):
        monkeypatch.delenv(f"SPLITVAULT_PUBLIC_{name}", raising=False)
    config = tmp_path / "public.toml"
    config.write_text('metrics_port = 9998\ngrpc_port = 7000\nprivate_addresses = ["p:1"]\n')
    return config


def _private(config: Path, **overrides: Any) -> PrivateSettings:
    return PrivateSettings.load(
        config, tier_dir=config.parent, kek_file=config.parent / "kek", **overrides
    )


def _public(config: Path, **overrides: Any) -> PublicSettings:
    return PublicSettings.load(config, tier_dir=config.parent, **overrides)


def test_a_none_override_switches_the_private_metrics_off(private_toml: Path) -> None:
    settings = _private(private_toml, metrics_port=None, lone_request_threads=None)
    assert (settings.metrics_port, settings.lone_request_threads) == (None, None)


def test_a_none_override_beats_the_environment_too(
    private_toml: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPLITVAULT_PRIVATE_METRICS_PORT", "1234")
    assert _private(private_toml).metrics_port == 1234
    assert _private(private_toml, metrics_port=None).metrics_port is None


def test_not_given_keeps_the_files_values(private_toml: Path) -> None:
    for settings in (_private(private_toml), _private(private_toml, metrics_port=UNSET)):
        assert (settings.metrics_port, settings.lone_request_threads) == (9999, 3)
    unset_port = _private(private_toml, port=given(None), host=given(None))
    assert (unset_port.port, unset_port.host) == (6000, "127.0.0.1")
    assert _private(private_toml, port=given(0)).port == 0  # 0 is given, not falsy-dropped


def test_the_defaults_stand_without_a_file(tmp_path: Path) -> None:
    settings = _private(tmp_path / "missing.toml", metrics_port=UNSET)
    assert settings.metrics_port == PrivateSettings.model_fields["metrics_port"].default == 9464


def test_the_public_tier_reads_overrides_alike(public_toml: Path) -> None:
    assert (_public(public_toml).metrics_port, _public(public_toml).grpc_port) == (9998, 7000)
    off = _public(public_toml, metrics_port=None, grpc_port=None, private_addresses=UNSET)
    assert (off.metrics_port, off.grpc_port, off.private_addresses) == (None, None, ["p:1"])
    assert _public(public_toml, insecure_http=given(None)).insecure_http is False


def test_none_for_a_required_value_is_refused_not_ignored(public_toml: Path) -> None:
    with pytest.raises(ValueError, match="private_addresses"):
        _public(public_toml, private_addresses=None)


def test_given_maps_only_none_to_unset() -> None:
    assert given(None) is UNSET
    values: list[object] = [0, "", False, []]
    assert [given(value) for value in values] == values
