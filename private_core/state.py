"""The private tier's writable state folder (watermark trigger log): writable, or no serving.

The private tier keeps evidence of what it answered; an answer it could not record would be
evidence lost for good. So, as the public tier's audit trail refuses by default, the tier
refuses to start (``private_state_unwritable``, exit status 1) when its ``state_dir`` cannot be
created or written, and its health check never reports SERVING. A write that fails later
refuses that request (see ``private_core.watermark.triggers``).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from shared.logs import get_logger

log = get_logger(__name__)


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
