"""Keep decrypted weights out of swap and core dumps (Linux, best effort, logged)."""

from __future__ import annotations

import ctypes
import ctypes.util
import resource
import sys

from shared.logs import get_logger

_MCL_CURRENT, _MCL_FUTURE = 1, 2
_PR_SET_DUMPABLE = 4
log = get_logger(__name__)


def protect_process_memory(lock: bool) -> None:
    """Disable core dumps and, if ``lock``, pin pages in RAM so weights never reach swap."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)
    if lock and libc.mlockall(_MCL_CURRENT | _MCL_FUTURE) != 0:
        errno = ctypes.get_errno()
        log.warning(
            "memory_lock_unavailable",
            errno=errno,
            hint="grant CAP_IPC_LOCK or raise RLIMIT_MEMLOCK so weights cannot be swapped",
        )
