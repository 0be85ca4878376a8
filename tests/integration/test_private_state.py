"""The private tier refuses to start when its state folder cannot be written, or when another
private tier holds it (real processes).

Watermark evidence it could not keep would be lost for good, so the tier logs
``private_state_unwritable`` and exits 1 before it binds a port: its health check never reports
SERVING (compose keeps the public tier waiting; Kubernetes never marks the pod ready). The
folder is made unwritable for real: a read-only tmpfs where this process may mount (as the
container saw it), else a read-only folder for a user without CAP_DAC_OVERRIDE, else a file
where the folder should be. Two tiers on one folder would interleave their trigger logs, so the
second refuses to start (``private_state_locked``, exit 1) while the first serves on; the lock
goes with its holder, even one killed with SIGKILL.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from private_core.state import LOCK_FILE
from shared.layout import DeployLayout
from splitvault.deploy import init_deployment
from splitvault.probes import probe_private
from tests.support.processes import TierProcess, start_private

ROOT = Path(__file__).resolve().parents[2]
ENV = {"SPLITVAULT_PRIVATE_TORCH_THREADS": "1", "SPLITVAULT_PRIVATE_METRICS_PORT": "0"}


@pytest.fixture(scope="module")
def deploy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("state") / "deploy"
    init_deployment(root)
    return root


def _mount_read_only(folder: Path) -> bool:
    mount = ["mount", "-t", "tmpfs", "-o", "ro,size=1m,mode=0777", "tmpfs", str(folder)]
    try:
        return subprocess.run(mount, capture_output=True, check=False, timeout=10).returncode == 0
    except OSError:
        return False


@pytest.fixture
def unwritable(tmp_path: Path) -> Iterator[Path]:
    """A state folder no write can succeed in, made so for real."""
    folder = tmp_path / "state"
    folder.mkdir()
    if _mount_read_only(folder):
        try:
            yield folder
        finally:
            subprocess.run(["umount", "-l", str(folder)], check=False, capture_output=True)
    elif os.geteuid() != 0:
        folder.chmod(0o500)
        yield folder
        folder.chmod(0o700)
    else:
        folder.rmdir()
        folder.write_text("a file where the state folder should be")
        yield folder / "private"


def _events(output: str) -> list[dict[str, Any]]:
    found = []
    for line in output.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict):
            found.append(event)
    return found


def _serve_to_exit(deploy: Path, state: Path) -> subprocess.CompletedProcess[str]:
    """``serve private`` on ``state``, expected to exit by itself."""
    command = ["serve", "private", "--deploy", str(deploy), "--port", "0"]
    return subprocess.run(
        [sys.executable, "-m", "splitvault", *command],
        env={**os.environ, **ENV, "SPLITVAULT_PRIVATE_STATE_DIR": str(state)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=ROOT,
    )


def test_an_unwritable_state_folder_stops_the_private_tier(deploy: Path, unwritable: Path) -> None:
    result = _serve_to_exit(deploy, unwritable)
    events = _events(result.stdout + result.stderr)
    names = [event.get("event") for event in events]
    assert result.returncode == 1, result.stdout + result.stderr
    refusal = next(e for e in events if e.get("event") == "private_state_unwritable")
    assert refusal["state_dir"] == str(unwritable) and refusal["level"] == "error"
    assert "private_tier_listening" not in names
    assert "Traceback" not in result.stderr


def test_a_missing_state_folder_is_created_private(deploy: Path, tmp_path: Path) -> None:
    state = tmp_path / "volume" / "private"
    tier = start_private(deploy, env={**ENV, "SPLITVAULT_PRIVATE_STATE_DIR": str(state)})
    try:
        assert state.is_dir() and state.stat().st_mode & 0o777 == 0o700
        # The write probe is gone; only the tier's own state was made there, none of it
        # readable by other users.
        names = {p.name for p in state.iterdir()}
        assert "ledger" in names and not any(n.startswith(".write-probe") for n in names)
        for path in state.rglob("*"):
            assert path.stat().st_mode & 0o077 == 0, path
    finally:
        tier.stop()


def _ready(deploy: Path, tier: TierProcess) -> bool:
    return probe_private(DeployLayout(deploy), f"127.0.0.1:{tier.port}").ready


def test_a_second_tier_on_a_held_state_folder_refuses_to_start(
    deploy: Path, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    first = start_private(deploy, env={**ENV, "SPLITVAULT_PRIVATE_STATE_DIR": str(state)})
    try:
        second = _serve_to_exit(deploy, state)
        assert second.returncode == 1, second.stdout + second.stderr
        events = _events(second.stdout + second.stderr)
        refusal = next(e for e in events if e.get("event") == "private_state_locked")
        assert refusal["level"] == "error" and refusal["state_dir"] == str(state)
        assert refusal["holder_pid"] == first.process.pid
        assert f"{state} is in use by another private tier (PID {first.process.pid}" in (
            second.stderr
        )
        assert "private_tier_listening" not in [e.get("event") for e in events]
        assert "Traceback" not in second.stderr
        assert first.process.poll() is None and _ready(deploy, first)  # serves on
    finally:
        assert first.stop() == 0
    after = start_private(deploy, env={**ENV, "SPLITVAULT_PRIVATE_STATE_DIR": str(state)})
    try:
        assert _ready(deploy, after)
        assert (state / LOCK_FILE).read_text().strip() == str(after.process.pid)
    finally:
        after.stop()


def test_a_killed_holder_leaves_no_lock_behind(deploy: Path, tmp_path: Path) -> None:
    env = {**ENV, "SPLITVAULT_PRIVATE_STATE_DIR": str(tmp_path / "state")}
    killed = start_private(deploy, env=env)
    killed.process.kill()  # SIGKILL: no handler runs, the kernel closes its files
    assert killed.stop() == -9
    again = start_private(deploy, env=env)
    try:
        assert _ready(deploy, again)
        assert "private_state_locked" not in [e.get("event") for e in again.events()]
    finally:
        again.stop()
