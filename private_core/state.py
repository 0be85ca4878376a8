"""The private tier's writable state folder (watermark trigger log): writable, or no serving.

The private tier keeps evidence of what it answered; an answer it could not record would be
evidence lost for good. So, as the public tier's audit trail refuses by default, the tier
refuses to start (``private_state_unwritable``, exit status 1) when its ``state_dir`` cannot be
created or written, and its health check never reports SERVING. A write that fails later
refuses that request (see ``private_core.watermark.triggers``).

One tier per folder: ``lock_state_dir`` takes an exclusive ``flock`` on ``LOCK_FILE`` for the
process's life, and a second tier started on the same folder refuses to start
(``private_state_locked``, exit status 1) naming the holder's PID.
"""

from __future__ import annotations

import errno
import fcntl
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from shared.logs import get_logger
from shared.state_files import FILE_MODE

log = get_logger(__name__)
LOCK_FILE = "private-tier.lock"  # in state_dir: the flock one private tier holds (its PID)


class StateUnwritable(RuntimeError):
    """The private tier's state folder cannot be created or written."""


def require_writable_state(state_dir: Path) -> None:
    """Create ``state_dir`` (mode 0700) if missing and write, sync and remove a probe file in it;
    log ``private_state_unwritable`` and raise ``StateUnwritable`` if any of it fails."""
    try:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=state_dir)
        try:
            os.write(fd, b"splitvault")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as error:
        log.error(
            "private_state_unwritable",
            state_dir=str(state_dir),
            reason=f"{type(error).__name__}: {error.strerror or error}",
            hint="give the tier's user a writable state_dir (SPLITVAULT_PRIVATE_STATE_DIR)",
        )
        raise StateUnwritable(f"cannot write the private tier's state in {state_dir}") from None


class StateLocked(RuntimeError):
    """Another private tier holds this state folder (``lock_state_dir``)."""


@dataclass
class StateLock:
    """The state folder's lock, held while ``fd`` is open; the OS drops it when the process
    exits, however it exits (SIGKILL included)."""

    path: Path
    fd: int | None

    def release(self) -> None:
        """Close the lock file, releasing the lock (idempotent)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def lock_state_dir(state_dir: Path) -> StateLock:
    """Take the exclusive ``flock`` on ``state_dir/LOCK_FILE`` and write this PID in it.

    The whole folder is locked, not each replica's files: the trigger logs, admission counters
    and nonces in it are per folder, and two tiers appending to one trigger log make it fail
    authentication. ``StateLocked`` (logged ``private_state_locked``) when another process
    holds it; ``StateUnwritable`` when the lock cannot be taken at all (a file system without
    ``flock``): no lock, no serving.
    """
    path = state_dir / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
    except OSError as error:
        raise _unwritable(state_dir, error) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        holder = _holder(fd)
        os.close(fd)
        if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise _unwritable(state_dir, error) from None
        raise _locked(state_dir, path, holder) from None
    os.fchmod(fd, FILE_MODE)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    log.info("private_state_lock_taken", state_dir=str(state_dir), pid=os.getpid())
    return StateLock(path, fd)


def _holder(fd: int) -> int | None:
    """The PID the lock's holder wrote (None: not written yet, or not a PID)."""
    text = os.pread(fd, 32, 0).decode("ascii", errors="replace").strip()
    return int(text) if text.isdigit() else None


def _locked(state_dir: Path, path: Path, holder: int | None) -> StateLocked:
    who = f"PID {holder}" if holder is not None else "PID unknown"
    log.error(
        "private_state_locked",
        state_dir=str(state_dir),
        lock_file=str(path),
        holder_pid=holder,
        hint="give each private tier a state folder of its own (SPLITVAULT_PRIVATE_STATE_DIR)",
    )
    return StateLocked(
        f"the private tier's state folder {state_dir} is in use by another private tier "
        f"({who}, as that process sees itself); refusing to start"
    )


def _unwritable(state_dir: Path, error: OSError) -> StateUnwritable:
    log.error(
        "private_state_unwritable",
        state_dir=str(state_dir),
        reason=f"cannot lock it: {type(error).__name__}: {error.strerror or error}",
        hint="a local file system with flock (not every network file system has it)",
    )
    return StateUnwritable(f"cannot lock the private tier's state folder {state_dir}")
