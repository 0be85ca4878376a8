"""compose.postgres.yaml: the public tier's state in PostgreSQL and its limits in Redis.

Read as compose merges it over compose.yaml (maps merged, the network and secret lists joined):
PostgreSQL and Redis are reachable only from the public tier, never from the private tier or the
host; the DSN is a secret file; both stores run hardened and are health-checked before the public
tier starts. ``docker compose config`` resolves the pair where compose is installed.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.test_compose import COMPOSE, ROOT, _compose_command, _interpolate

OVERRIDE = ROOT / "compose.postgres.yaml"
STORES = ("postgres", "redis")


def _merged(base: Any, override: Any) -> Any:
    """compose's merge for what these files use: maps merged, lists joined without repeats."""
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            merged[key] = _merged(base[key], value) if key in base else value
        return merged
    if isinstance(base, list) and isinstance(override, list):
        return base + [item for item in override if item not in base]
    return override


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    merged = _merged(yaml.safe_load(COMPOSE.read_text()), yaml.safe_load(OVERRIDE.read_text()))
    assert isinstance(merged, dict)
    return merged


def test_the_stores_are_reachable_from_the_public_tier_only(compose: dict[str, Any]) -> None:
    services, networks = compose["services"], compose["networks"]
    private = set(services["private"]["networks"])
    public = set(services["public"]["networks"])
    for name in STORES:
        store = services[name]
        assert "ports" not in store and "network_mode" not in store, name
        assert store["networks"] == ["state"], name
    assert networks["state"]["internal"] is True
    assert "state" in public
    assert "state" not in private  # public-side state: the private tier cannot reach it
    assert not private & set(services["postgres"]["networks"])


def test_the_dsn_is_a_secret_file_of_the_public_tier(compose: dict[str, Any]) -> None:
    services = compose["services"]
    env = services["public"]["environment"]
    assert env["SPLITVAULT_PUBLIC_STATE_BACKEND"] == "postgres"
    assert env["SPLITVAULT_PUBLIC_POSTGRES_DSN_FILE"] == "/run/secrets/postgres_dsn"
    assert services["public"]["secrets"] == ["postgres_dsn"]
    dsn_file = _interpolate(compose["secrets"]["postgres_dsn"]["file"])
    assert os.path.normpath(dsn_file) == "deploy/secrets/postgres.dsn"
    assert services["private"]["secrets"] == ["kek"]
    assert not any("POSTGRES" in key for key in services["private"]["environment"])
    postgres = services["postgres"]
    assert "POSTGRES_PASSWORD" not in postgres["environment"]
    assert postgres["environment"]["POSTGRES_PASSWORD_FILE"] == "/run/secrets/postgres_password"
    assert postgres["secrets"] == ["postgres_password"]
    redis_url = env["SPLITVAULT_PUBLIC_PROTECTION__REDIS_URL"]
    assert redis_url.startswith("redis://redis:6379/")
    assert env["SPLITVAULT_PUBLIC_PROTECTION__RATE_LIMIT_BACKEND"] == "redis"


@pytest.mark.parametrize("name", STORES)
def test_the_stores_are_hardened_and_health_checked(compose: dict[str, Any], name: str) -> None:
    store = compose["services"][name]
    assert store["read_only"] is True
    assert store["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in store["security_opt"]
    assert store["user"].split(":")[0] not in {"0", "root"}
    assert ":" in store["image"] and not store["image"].endswith(":latest")
    assert store["healthcheck"]["test"][0] == "CMD"
    depends = compose["services"]["public"]["depends_on"][name]
    assert depends["condition"] == "service_healthy"


def test_compose_config_resolves_with_the_override(tmp_path: Path) -> None:
    command = _compose_command()
    if command is None:
        pytest.skip("neither docker-compose nor 'docker compose' is installed")
    for part in ("public", "private", "secrets"):
        (tmp_path / part).mkdir()
    for secret in ("kek", "postgres.dsn", "postgres.password"):
        (tmp_path / "secrets" / secret).write_text("not-a-real-secret\n")
    result = subprocess.run(
        [*command, "-f", str(COMPOSE), "-f", str(OVERRIDE), "config"],
        capture_output=True,
        text=True,
        env={**os.environ, "SPLITVAULT_DEPLOY": str(tmp_path)},
        check=False,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert f"{tmp_path}/secrets/postgres.dsn" in result.stdout
