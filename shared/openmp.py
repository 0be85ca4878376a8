"""Idle OpenMP threads spin briefly in the serving tiers, then sleep.

libgomp (torch's OpenMP runtime) lets a thread that finished its share of a parallel region
spin for the next one, ``GOMP_SPINCOUNT`` pauses (300,000 by default: about 8 ms of a core on
the benchmark host, ``bench/openmp_idle_spin.py``), then sleep. The two tiers take turns on
one host's cores within each request: with the default, a tier that has just computed keeps a
core spinning while the other computes, and the computing tier's team then waits at each
barrier for a descheduled team mate (a lone MiniLM request on two threads, in-process on a
shared 2-core host: 339-488 ms spinning, 89-95 ms sleeping). Not spinning at all
(``OMP_WAIT_POLICY=PASSIVE``, the serve commands' setting before) wakes the team through the
kernel at every parallel region, hundreds per forward: MiniLM's lone back stage on two threads
took as long as on one. ``SERVING_SPIN_COUNT`` pauses (about 0.5 ms) bridge the gaps between
one forward's regions and stop soon after it.

libgomp reads the environment once, when torch loads it, so the serve commands set
``GOMP_SPINCOUNT`` before importing torch, unless the operator set it or ``OMP_WAIT_POLICY``
(either wins; an explicit ``GOMP_SPINCOUNT`` would override ``OMP_WAIT_POLICY``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping

from shared.logs import get_logger

log = get_logger(__name__)

WAIT_POLICY = "OMP_WAIT_POLICY"
SPIN_COUNT = "GOMP_SPINCOUNT"
SERVING_SPIN_COUNT = "10000"


def default_wait_policy(environ: MutableMapping[str, str] | None = None) -> tuple[str, bool]:
    """Set ``GOMP_SPINCOUNT`` to ``SERVING_SPIN_COUNT`` unless it or ``OMP_WAIT_POLICY`` is set;
    the policy in force (``OMP_WAIT_POLICY=...`` or ``GOMP_SPINCOUNT=...``) and whether it could
    still take effect (torch, and with it libgomp, not loaded yet in this process)."""
    target = os.environ if environ is None else environ
    effective = "torch" not in sys.modules
    if WAIT_POLICY in target and SPIN_COUNT not in target:
        return f"{WAIT_POLICY}={target[WAIT_POLICY]}", effective
    return f"{SPIN_COUNT}={target.setdefault(SPIN_COUNT, SERVING_SPIN_COUNT)}", effective


def log_wait_policy(policy: str, effective: bool) -> None:
    """Log the policy in force (``effective``: set before libgomp loaded)."""
    log.info("openmp_wait_policy", policy=policy, effective=effective)
