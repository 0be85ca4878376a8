"""The private tier's state-folder lock (``private_core.state.lock_state_dir``), in-process:
``flock`` locks belong to each open file, so a second open in this process is refused too."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from private_core.state import LOCK_FILE, StateLocked, lock_state_dir


def test_a_held_folder_is_refused_naming_the_folder_and_the_holder(tmp_path: Path) -> None:
    held = lock_state_dir(tmp_path)
    try:
        with pytest.raises(StateLocked, match=f"{tmp_path} is in use .* \\(PID {os.getpid()},"):
            lock_state_dir(tmp_path)
        assert (tmp_path / LOCK_FILE).read_text() == f"{os.getpid()}\n"
        assert (tmp_path / LOCK_FILE).stat().st_mode & 0o777 == 0o600
    finally:
        held.release()


def test_a_released_lock_can_be_taken_again(tmp_path: Path) -> None:
    first = lock_state_dir(tmp_path)
    first.release()
    first.release()  # idempotent
    second = lock_state_dir(tmp_path)
    second.release()


def test_a_holder_that_wrote_no_pid_yet_is_named_unknown(tmp_path: Path) -> None:
    held = lock_state_dir(tmp_path)
    try:
        (tmp_path / LOCK_FILE).write_text("")  # between the holder's flock and its write
        with pytest.raises(StateLocked, match="PID unknown"):
            lock_state_dir(tmp_path)
    finally:
        held.release()
