"""The deployment files keep their security promises: compose.yaml, Dockerfile, .dockerignore."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose.yaml"
MEMLOCK_OVERRIDE = Path(__file__).with_name("compose.memlock.yaml")
DOCKERFILE = ROOT / "Dockerfile"
TORCH_PIN = "torch==2.13.0"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
_DEFAULTED = re.compile(r"\$\{(\w+):-([^}]*)\}")


def _interpolate(text: str) -> str:
    """Resolve ``${VAR:-default}`` the way compose does when VAR is unset."""
    return _DEFAULTED.sub(lambda m: m.group(2), text)


def _volumes(service: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(source, target, mode) of each short-syntax volume of a service."""
    found = []
    for spec in service.get("volumes", []):
        source, target, *mode = _interpolate(spec).split(":")
        found.append((os.path.normpath(source), target, mode[0] if mode else "rw"))
    return found


def _compose_command() -> list[str] | None:
    """``docker-compose`` or ``docker compose``, whichever works without an engine."""
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker"):
        probe = subprocess.run(
            ["docker", "compose", "version"], capture_output=True, check=False, timeout=30
        )
        if probe.returncode == 0:
            return ["docker", "compose"]
    return None


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(loaded, dict)
    return loaded


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]  # type: ignore[no-any-return]


def test_compose_config_resolves(tmp_path: Path) -> None:
    command = _compose_command()
    if command is None:
        pytest.skip("neither docker-compose nor 'docker compose' is installed")
    for part in ("public", "private", "secrets"):
        (tmp_path / part).mkdir()
    (tmp_path / "secrets" / "kek").write_text("not-a-real-kek\n")
    env = {**os.environ, "SPLITVAULT_DEPLOY": str(tmp_path)}
    result = subprocess.run(
        [*command, "-f", str(COMPOSE), "config"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert f"{tmp_path}/private" in result.stdout
    assert f"{tmp_path}/public" in result.stdout
    assert f"{tmp_path}/secrets/kek" in result.stdout


def test_compose_uses_the_spec_format(compose: dict[str, Any]) -> None:
    assert "version" not in compose
    assert set(compose["services"]) == {"private", "public"}


def test_private_tier_is_unreachable_from_outside(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    private = services["private"]
    assert "ports" not in private
    assert "network_mode" not in private
    assert private["networks"]
    for name in private["networks"]:
        assert compose["networks"][name].get("internal") is True, name


def test_public_tier_publishes_only_https(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    public = services["public"]
    # The host side is SPLITVAULT_PUBLISH ([HOST_IP:]PORT), 8443 on every address by default.
    assert public["ports"] == ["${SPLITVAULT_PUBLISH:-8443}:8443"]
    assert [_interpolate(port) for port in public["ports"]] == ["8443:8443"]
    assert set(services["private"]["networks"]) <= set(public["networks"])
    assert any(not compose["networks"][n].get("internal") for n in public["networks"])
    assert public["depends_on"]["private"]["condition"] == "service_healthy"
    assert "private:50051" in public["command"]


@pytest.mark.parametrize("tier", ["public", "private"])
def test_each_tier_mounts_only_its_own_folder_read_only(
    services: dict[str, dict[str, Any]], tier: str
) -> None:
    mounts = _volumes(services[tier])
    assert mounts[0] == (f"deploy/{tier}", f"/deploy/{tier}", "ro")
    # Besides its read-only folder, each tier gets one writable named volume for its state,
    # mounted outside that folder (Docker cannot create a mount point in a read-only mount)
    # and named in the tier's settings.
    assert mounts[1:] == [(f"{tier}-state", f"/state/{tier}", "rw")]
    assert not mounts[1][1].startswith(mounts[0][1] + "/")
    env = services[tier]["environment"]
    assert env[f"SPLITVAULT_{tier.upper()}_STATE_DIR"] == f"/state/{tier}"


def test_state_volumes_are_writable_by_any_tier_uid(services: dict[str, dict[str, Any]]) -> None:
    """A new named volume takes the owner and mode of its mount point in the image: group
    10001 with setgid, which compose adds to whatever SPLITVAULT_UID runs each tier."""
    runs = [args for keyword, args in _instructions() if keyword == "RUN"]
    assert any(
        "install -d -o 10001 -g 10001 -m 2770 /state/public /state/private" in r for r in runs
    )
    for service in services.values():
        assert service["group_add"] == ["10001"]


def test_kek_is_a_secret_for_the_private_tier_only(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    kek_file = _interpolate(compose["secrets"]["kek"]["file"])
    assert os.path.normpath(kek_file) == "deploy/secrets/kek"
    assert services["private"]["secrets"] == ["kek"]
    assert services["private"]["environment"]["SPLITVAULT_PRIVATE_KEK_FILE"] == "/run/secrets/kek"
    assert "secrets" not in services["public"]
    assert not any("KEK" in key for key in services["public"].get("environment", {}))


@pytest.mark.parametrize("tier", ["public", "private"])
def test_each_tier_is_hardened_and_health_checked(
    services: dict[str, dict[str, Any]], tier: str
) -> None:
    service = services[tier]
    assert service["build"] == "."
    assert _interpolate(service["image"]) == "splitvault:latest"
    assert service["read_only"] is True
    assert service["tmpfs"] == ["/tmp"]
    assert service["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in service["security_opt"]
    assert not service.get("privileged", False)
    assert _interpolate(service["user"]).split(":")[0] not in {"0", "root"}
    assert service["healthcheck"]["test"][:4] == ["CMD", "splitvault", "health", tier]
    assert service["command"][:2] == ["serve", tier]


def test_only_the_private_tier_may_lock_memory(services: dict[str, dict[str, Any]]) -> None:
    assert services["private"]["cap_add"] == ["IPC_LOCK"]
    assert services["private"]["ulimits"]["memlock"] == {"soft": -1, "hard": -1}
    assert "cap_add" not in services["public"]


def test_the_test_override_only_lowers_memlock() -> None:
    """What the compose test changes: only what a host may be unable to grant."""
    override = yaml.safe_load(MEMLOCK_OVERRIDE.read_text())
    assert override == {
        "services": {"private": {"ulimits": {"memlock": {"soft": 8388608, "hard": 8388608}}}}
    }


def _instructions() -> list[tuple[str, str]]:
    """Dockerfile instructions as (KEYWORD, arguments), continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = (line.strip() for line in text.splitlines())
    pairs = [line.split(None, 1) for line in lines if line and not line.startswith("#")]
    return [(pair[0].upper(), pair[1] if len(pair) > 1 else "") for pair in pairs]


def test_dockerfile_pins_cpu_torch_first() -> None:
    instructions = _instructions()
    # The torch index is a build argument, CPU-only unless a builder passes another (or none).
    assert ("ARG", f"TORCH_INDEX_URL={CPU_INDEX}") in instructions
    assert not DOCKERFILE.read_text().startswith("# syntax=")  # nothing to fetch from Docker Hub
    runs = [args for keyword, args in instructions if keyword == "RUN"]
    torch_runs = [i for i, args in enumerate(runs) if re.search(r"\btorch[=<>~!]", args)]
    project_run = next(
        i for i, args in enumerate(runs) if re.search(r"pip install .*\s\.(\s|$)", args)
    )
    assert torch_runs, "no RUN installs torch"
    for i in torch_runs:
        assert TORCH_PIN in runs[i]
        assert '${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}' in runs[i]
        assert "torch.version.cuda is not None" in runs[i]  # a CUDA build fails the build
        assert i < project_run
    assert "[dev" not in runs[project_run]


def test_dockerfile_runs_as_a_non_root_user() -> None:
    instructions = _instructions()
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    final = instructions[last_from:]
    assert all(args.startswith("python:3.11-slim") for kw, args in instructions if kw == "FROM")
    users = [args for keyword, args in final if keyword == "USER"]
    assert users, "final stage has no USER"
    assert users[-1].split(":")[0] not in {"0", "root"}
    assert ("ENTRYPOINT", '["splitvault"]') in final
    assert not any(keyword == "HEALTHCHECK" for keyword, _ in instructions)


def test_dockerignore_keeps_deployments_out_of_the_image() -> None:
    rules = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert rules[0] == "*"
    allowed = {rule[1:].rstrip("/") for rule in rules if rule.startswith("!")}
    assert "pyproject.toml" in allowed
    assert not allowed & {"deploy", "secrets", "ca", ".venv", ".git", "tests"}


def test_torch_is_pinned_the_same_everywhere() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    torch_deps = [dep for dep in project["dependencies"] if re.match(r"torch\b", dep)]
    assert torch_deps == [TORCH_PIN]
    assert f'"{TORCH_PIN}"' in (ROOT / "scripts" / "setup.sh").read_text()
