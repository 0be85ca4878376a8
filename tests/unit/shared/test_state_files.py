"""State folders are 0700 and state files 0600 whatever the umask, and checked at start."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from public_api.audit_writer import AuditTrail
from public_api.keys import SqliteKeyStore
from public_api.monitor import SqliteAssessmentLog
from shared.state_files import StatePermissionError, check_state_dir, private_dir, private_file


@contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): _mode(p) for p in [root, *root.rglob("*")]}


def test_private_dir_and_file_ignore_a_permissive_umask(tmp_path: Path) -> None:
    with umask(0):
        private_file(tmp_path / "a" / "b" / "f")
        private_dir(tmp_path / "a" / "c")
    assert _modes(tmp_path / "a") == {".": 0o700, "b": 0o700, "b/f": 0o600, "c": 0o700}


def test_private_file_keeps_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_text("kept")
    private_file(path)
    assert path.read_text() == "kept"


def test_the_state_stores_and_their_wal_files_are_0600(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with umask(0):
        keys = SqliteKeyStore(state / "keys.sqlite3")
        keys.create("k")
        trail = AuditTrail.open(state / "audit.sqlite3")
        SqliteAssessmentLog(state / "monitor.sqlite3")
        try:
            modes = _modes(state)
        finally:
            trail.close()
            keys.close()
    assert modes.pop(".") == 0o700
    assert {"keys.sqlite3-wal", "keys.sqlite3-shm", "audit.sqlite3"} <= set(modes)
    assert set(modes.values()) == {0o600}, modes


def test_check_tightens_what_is_loose_and_says_so(tmp_path: Path) -> None:
    state = tmp_path / "state"
    (state / "triggers" / "digits").mkdir(parents=True)
    (state / "keys.sqlite3").write_text("")
    (state / "triggers" / "digits" / "000000000001.seg").write_text("")
    for path in [state, *state.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    (tmp_path / "elsewhere").write_text("")
    (tmp_path / "elsewhere").chmod(0o644)
    (state / "link").symlink_to(tmp_path / "elsewhere")
    with capture_logs() as logs:
        check_state_dir(state, create=False)
    modes = _modes(state)
    assert modes.pop("link") == _mode(state / "link")  # links are left alone...
    assert _mode(tmp_path / "elsewhere") == 0o644  # ...and not followed
    assert modes == {
        ".": 0o700,
        "triggers": 0o700,
        "triggers/digits": 0o700,
        "keys.sqlite3": 0o600,
        "triggers/digits/000000000001.seg": 0o600,
    }
    fixed = {
        e["path"]: (e["mode"], e["fixed"]) for e in logs if e["event"] == "state_permissions_fixed"
    }
    assert fixed[str(state / "keys.sqlite3")] == ("0644", "0600")
    assert fixed[str(state)] == ("0755", "0700")
    assert len(fixed) == 5
    with capture_logs() as again:
        check_state_dir(state, create=False)
    assert again == []


def test_check_makes_the_folder_only_when_asked(tmp_path: Path) -> None:
    check_state_dir(tmp_path / "absent", create=False)
    assert not (tmp_path / "absent").exists()
    with umask(0):
        check_state_dir(tmp_path / "made", create=True)
    assert _mode(tmp_path / "made") == 0o700


def test_check_refuses_what_it_cannot_tighten(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file of another user (simulated: this may run as root, who can chmod anything)."""
    state = private_dir(tmp_path / "state")
    (state / "audit.sqlite3").write_text("")
    (state / "audit.sqlite3").chmod(0o644)

    def not_owner(path: object, mode: int) -> None:
        raise PermissionError(1, "Operation not permitted", str(path))

    monkeypatch.setattr(os, "chmod", not_owner)
    with pytest.raises(StatePermissionError, match=r"audit.sqlite3 has mode 0644"):
        check_state_dir(state, create=False)
