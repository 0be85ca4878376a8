"""Keep the garbage collector's full passes away from the objects a tier loads at startup.

A loaded tier holds about half a million objects that live as long as the process (torch.export
graphs, sympy expressions, modules). CPython's oldest-generation collection walks all of them:
a few hundred milliseconds on a shared 2-core host, paid by whichever requests are in flight
when it runs. ``gc.freeze`` moves them to a permanent generation the collector skips; objects
created later are collected as before.
"""

from __future__ import annotations

import gc

from shared.logs import get_logger

log = get_logger(__name__)


def freeze_startup_objects() -> int:
    """Collect once, then exempt every surviving object from future collections; their count."""
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.info("startup_objects_frozen", objects=frozen)
    return frozen
