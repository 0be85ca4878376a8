"""A tier's state folder is its user's alone: 0700 folders and 0600 files, whatever the umask.

The public tier's state holds client addresses, key hashes and the audit trail; the private
tier's, watermark trigger records. ``private_file`` and ``private_dir`` create them so (SQLite
gives a database's ``-wal`` and ``-shm`` files the database file's mode). ``check_state_dir``
runs at each tier's start: it tightens anything looser, with a ``state_permissions_fixed``
warning, and refuses to start (``StatePermissionError``) when it cannot, except on the state
folder itself when that is a mount point this user does not own (a Kubernetes or compose
volume): that is logged as ``state_permissions_not_fixed``.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from shared.logs import get_logger

log = get_logger(__name__)
DIR_MODE = 0o700
FILE_MODE = 0o600


class StatePermissionError(ValueError):
    """A state file or folder is open to other users and this user cannot change that."""


def private_dir(path: Path) -> Path:
    """Make ``path`` and its missing parents as 0700 folders; existing ones are left alone."""
    missing: list[Path] = []
    folder = path
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for folder in reversed(missing):
        try:
            folder.mkdir(mode=DIR_MODE)
        except FileExistsError:
            continue
        os.chmod(folder, DIR_MODE)  # mkdir's mode is masked by the umask
    return path


def private_file(path: Path) -> Path:
    """Make ``path`` an empty 0600 file (in a ``private_dir``) unless it exists."""
    private_dir(path.parent)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    except FileExistsError:
        return path
    try:
        os.fchmod(fd, FILE_MODE)  # os.open's mode is masked by the umask
    finally:
        os.close(fd)
    return path


def check_state_dir(root: Path, *, create: bool) -> None:
    """Tighten ``root`` and everything in it to 0700 folders and 0600 files (see the module).

    ``create``: make ``root`` when missing; otherwise a missing ``root`` is left for later.
    Symbolic links are neither followed nor changed.
    """
    if create:
        private_dir(root)
    if not root.is_dir():
        return
    _tighten(root, DIR_MODE, root)
    for folder, folders, files in os.walk(root):
        for name in folders:
            _tighten(Path(folder) / name, DIR_MODE, root)
        for name in files:
            _tighten(Path(folder) / name, FILE_MODE, root)


def _tighten(path: Path, wanted: int, root: Path) -> None:
    info = path.lstat()
    if stat.S_ISLNK(info.st_mode):
        return
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077 == 0:
        return
    try:
        os.chmod(path, wanted)
    except PermissionError:
        if path == root and os.path.ismount(root):
            log.warning("state_permissions_not_fixed", path=str(path), mode=f"{mode:04o}")
            return
        raise StatePermissionError(
            f"{path} has mode {mode:04o} (open to other users) and this user cannot "
            f"change it: make it {wanted:04o} and owned by the tier's user"
        ) from None
    log.warning(
        "state_permissions_fixed", path=str(path), mode=f"{mode:04o}", fixed=f"{wanted:04o}"
    )
