"""The private store's checks before serving, against real ``redis-server`` processes: only a
store of the private tier's own (its own password, not the public tier's server) is accepted."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import SecretStr

from private_core.private_redis import PrivateStoreRefused, check_private_store
from private_core.private_redis_settings import StateStoreSettings
from tests.support.redis_server import RedisServer, redis_server_fixture

PASSWORD = "the-private-store-password"

open_store = redis_server_fixture(scope="module", name="open_store")


@pytest.fixture(scope="module")
def private_store(
    tmp_path_factory: pytest.TempPathFactory, open_store: RedisServer
) -> Iterator[RedisServer]:
    """A store with a password (``open_store`` already skipped when redis-server is missing)."""
    with RedisServer(tmp_path_factory.mktemp("private-redis"), password=PASSWORD) as server:
        yield server


def _settings(url: str, password: str = PASSWORD) -> StateStoreSettings:
    return StateStoreSettings(redis_url=url, password=SecretStr(password))


def _deploy(tmp_path: Path, public_url: str) -> Path:
    """A deployment folder whose public settings name ``public_url`` as the public tier's Redis."""
    (tmp_path / "public").mkdir()
    (tmp_path / "public" / "public.toml").write_text(f'[protection]\nredis_url = "{public_url}"\n')
    return tmp_path


def test_a_store_of_its_own_is_accepted(private_store: RedisServer, tmp_path: Path) -> None:
    check_private_store(
        _settings(private_store.url), _deploy(tmp_path, "redis://public-redis:6379/0")
    )


def test_a_store_that_answers_without_a_password_is_refused(open_store: RedisServer) -> None:
    with pytest.raises(PrivateStoreRefused, match="without a password"):
        check_private_store(_settings(open_store.url), None)


def test_the_public_tiers_store_is_refused(private_store: RedisServer, tmp_path: Path) -> None:
    """Even with a password: the public tier's settings name this very server."""
    deploy = _deploy(tmp_path, private_store.url.replace("?db=0", "?db=3"))
    with pytest.raises(PrivateStoreRefused, match="public tier's store"):
        check_private_store(_settings(private_store.url), deploy)


def test_the_public_stores_password_is_refused(private_store: RedisServer, tmp_path: Path) -> None:
    deploy = _deploy(tmp_path, f"redis://:{PASSWORD}@public-redis:6379/0")
    with pytest.raises(PrivateStoreRefused, match="password is the public"):
        check_private_store(_settings(private_store.url), deploy)


def test_a_wrong_password_is_refused(private_store: RedisServer) -> None:
    with pytest.raises(PrivateStoreRefused, match=r"password .* is refused"):
        check_private_store(_settings(private_store.url, "not-the-password"), None)


def test_an_unreachable_store_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PrivateStoreRefused, match="cannot be reached"):
        check_private_store(_settings(f"unix://{tmp_path}/none.sock?db=0"), None)


def test_an_unreadable_password_file_is_refused(private_store: RedisServer, tmp_path: Path) -> None:
    settings = StateStoreSettings(redis_url=private_store.url, password_file=tmp_path / "none")
    with pytest.raises(PrivateStoreRefused, match="password cannot be read"):
        check_private_store(settings, None)
