"""The load generator keeps its own heap out of its collector's passes while it measures."""

from __future__ import annotations

import gc

from bench.loadgen import heap_frozen


def test_the_heap_is_frozen_during_a_window_and_tracked_again_after() -> None:
    held = [[index] for index in range(50_000)]  # the bench's models and data, in miniature
    gc.unfreeze()  # as in the benchmark's process, where nothing else freezes
    with heap_frozen():
        assert gc.get_freeze_count() >= len(held)
        tracked = {id(obj) for obj in gc.get_objects()}
        assert id(held[0]) not in tracked  # a full pass would not walk it
        made_during = [0]
        assert any(obj is made_during for obj in gc.get_objects())  # new objects are collected
    assert gc.get_freeze_count() == 0
    assert any(obj is held[0] for obj in gc.get_objects())


def test_a_heap_frozen_before_stays_frozen() -> None:
    gc.freeze()  # e.g. a tier's startup objects in the same process
    try:
        with heap_frozen():
            pass
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
