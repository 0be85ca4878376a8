"""Startup objects leave the collector's passes; objects made afterwards are collected as usual."""

from __future__ import annotations

import gc

from shared.heap import freeze_startup_objects


def _tracked(target: object) -> bool:
    return any(candidate is target for candidate in gc.get_objects())


def test_startup_objects_are_frozen_and_later_ones_are_not() -> None:
    loaded_at_startup = [object()]
    try:
        frozen = freeze_startup_objects()
        assert frozen == gc.get_freeze_count() > 0
        assert not _tracked(loaded_at_startup)  # in the permanent generation now
        made_later = [object()]
        assert _tracked(made_later)
    finally:
        gc.unfreeze()
    assert _tracked(loaded_at_startup)
