"""Idle OpenMP threads sleep in the serving tiers instead of spinning.

libgomp (torch's OpenMP runtime) lets a thread that finished its share of a parallel region
spin for the next one (``GOMP_SPINCOUNT``: 300,000 pauses by default, milliseconds). The two
tiers take turns on one host's cores within each request: a tier that has just computed keeps
a core spinning while the other computes, and the computing tier's team then waits at each
barrier for a descheduled team mate (a lone MiniLM request on two threads, in-process on a
shared 2-core host: 339-488 ms spinning, 89-95 ms sleeping). ``OMP_WAIT_POLICY=PASSIVE``
makes idle threads sleep. libgomp reads it once, when torch loads it, so the serve commands
set it before importing torch; an operator's own value wins.
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping

from shared.logs import get_logger

log = get_logger(__name__)

WAIT_POLICY = "OMP_WAIT_POLICY"
SERVING_WAIT_POLICY = "PASSIVE"


def default_wait_policy(environ: MutableMapping[str, str] | None = None) -> tuple[str, bool]:
    """Set ``OMP_WAIT_POLICY`` to PASSIVE unless it is set; the policy in force and whether it
    could still take effect (torch, and with it libgomp, not loaded yet in this process)."""
    target = os.environ if environ is None else environ
    return target.setdefault(WAIT_POLICY, SERVING_WAIT_POLICY), "torch" not in sys.modules


def log_wait_policy(policy: str, effective: bool) -> None:
    """Log the policy in force (``effective``: set before libgomp loaded)."""
    log.info("openmp_wait_policy", policy=policy, effective=effective)
