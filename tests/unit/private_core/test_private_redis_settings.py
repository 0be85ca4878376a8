"""The private store's settings refuse what would open it to the public tier."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from private_core.private_redis_settings import StateStoreSettings, configured_state_store


def test_no_store_by_default() -> None:
    assert StateStoreSettings().redis_url is None


def test_a_store_needs_a_password() -> None:
    with pytest.raises(ValidationError, match="needs a password"):
        StateStoreSettings(redis_url="redis://private-redis:6379/0")


@pytest.mark.parametrize(
    "url", ["redis://:secret@private-redis:6379/0", "redis://user:secret@private-redis/0"]
)
def test_credentials_in_the_url_are_refused(url: str) -> None:
    with pytest.raises(ValidationError, match="carries credentials"):
        StateStoreSettings(redis_url=url, password=SecretStr("secret"))


def test_only_redis_schemes(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="scheme"):
        StateStoreSettings(redis_url="http://private-redis:6379", password=SecretStr("secret"))


def test_the_password_comes_from_its_file(tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_text("from-the-file\n")
    settings = StateStoreSettings(
        redis_url="rediss://private-redis:6380/0",
        password_file=secret,
        password=SecretStr("ignored"),
    )
    assert settings.secret() == "from-the-file"
    secret.write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        settings.secret()


def test_operator_commands_read_the_tiers_own_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``keys signer-register`` writes where the tier reads: private.toml, then environment."""
    (tmp_path / "private").mkdir()
    (tmp_path / "private" / "private.toml").write_text(
        '[state_store]\nredis_url = "redis://from-toml:6379/0"\npassword = "p"\n'
    )
    assert configured_state_store(tmp_path).redis_url == "redis://from-toml:6379/0"
    monkeypatch.setenv("SPLITVAULT_PRIVATE_STATE_STORE__REDIS_URL", "redis://from-env:6379/0")
    assert configured_state_store(tmp_path).redis_url == "redis://from-env:6379/0"
