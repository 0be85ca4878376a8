"""The watermark diagnosis's helpers: which held-out digit each thief query came from, and the
owner's key-free candidates between two classes."""

from __future__ import annotations

import numpy as np

from bench.thieves import thief_pool
from bench.watermark_diagnosis import between_classes, siblings


def _digits(count: int) -> np.ndarray:
    rng = np.random.default_rng(4)
    return rng.uniform(0.0, 1.0, size=(count, 1, 8, 8)).astype(np.float32)


def test_siblings_name_the_digit_each_thief_query_was_made_from() -> None:
    natural = _digits(30)
    pool, base = thief_pool(natural, 200, 1), siblings(natural, 200, 1)
    assert len(base) == len(pool)
    np.testing.assert_array_equal(pool[:30], natural[base[:30]])  # the natural digits first
    # An augmented copy (one-pixel shift, contrast, light noise) is nearer its own digit than
    # the other digits are on average.
    distances = np.abs(pool[30:, None] - natural[None]).reshape(170, 30, -1).mean(axis=2)
    own = distances[np.arange(170), base[30:]]
    assert np.median(own) < np.median(distances)


def test_between_classes_keeps_only_unsure_points_between_two_classes() -> None:
    images = np.array([[[0.0]], [[1.0]], [[0.1]], [[0.9]]], dtype=np.float32)

    def probabilities(x: np.ndarray) -> np.ndarray:
        p = x.reshape(len(x), -1).mean(axis=1).astype(np.float64)
        return np.stack([1 - p, p], axis=1)  # class 1 grows along the segment

    found = between_classes(images, probabilities, 50, 0.2, np.random.default_rng(0))
    assert 0 < len(found) <= 50
    margins = np.abs(1 - 2 * found.reshape(len(found)))
    assert (margins < 0.2).all()


def test_between_classes_needs_two_classes() -> None:
    images = np.zeros((5, 1, 2, 2), dtype=np.float32)

    def one_class(x: np.ndarray) -> np.ndarray:
        return np.tile([0.9, 0.1], (len(x), 1))

    assert len(between_classes(images, one_class, 10, 0.5, np.random.default_rng(0))) == 0
