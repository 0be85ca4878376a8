"""The monitor's fast paths give what its reference computations give: the row statistics from
folded constant matrices, the one-row fold of a stream and the FP16 conversion of a group."""

from __future__ import annotations

import numpy as np
import pytest

from private_core.activation_monitor import as_float32
from private_core.activation_profile import build_profile, raw_statistics
from private_core.activation_scoring import RowStatistics
from private_core.activation_streams import RowEvidence, Stream, log_ratios, probes_of
from private_core.monitor_settings import ActivationMonitorSettings

CHANNELS, WIDTH = 4, 4 * 16


def natural(n: int, seed: int) -> np.ndarray:
    """Post-ReLU rows of a few latent factors, as the transport's FP16 gives them."""
    rng = np.random.default_rng(seed)
    mixing = np.random.default_rng(0).standard_normal((8, WIDTH))
    rows = np.maximum(rng.standard_normal((n, 8)) @ mixing - 0.3, 0)
    return rows.astype(np.float16).astype(np.float32)


@pytest.mark.parametrize("channels", [0, CHANNELS])
def test_row_statistics_equal_the_profile_statistics(channels: int) -> None:
    profile = build_profile(natural(800, 1), channels=channels)
    projection = np.random.default_rng(2).standard_normal((WIDTH, 32)).astype(np.float32)
    statistics = RowStatistics(profile, projection)
    noise = np.random.default_rng(3).uniform(0, 3, (20, WIDTH)).astype(np.float32)
    for rows in (natural(20, 4), noise, natural(1, 5)):
        raw, projected = statistics.raw(rows)
        np.testing.assert_allclose(raw, raw_statistics(profile, rows), rtol=1e-4, atol=1e-4)
        centred = rows - profile.mean
        np.testing.assert_allclose(projected, centred @ projection, rtol=1e-4, atol=1e-4)


def one_row(row: np.ndarray, score: float, unit: float | None) -> RowEvidence:
    projected = row[None].astype(np.float32)
    scales = np.full(1, 1.0 if unit is None else unit, np.float32)
    scores = np.asarray([score], np.float32)
    return RowEvidence(scores, scores > 4.0, projected, scales, 1.0, unit, probes_of(projected))


@pytest.mark.parametrize("unit", [1.0, None])
def test_the_one_row_fold_equals_the_general_fold(unit: float | None) -> None:
    """Repeats (distance 0), near duplicates inside the band, rows just outside it and far
    rows, through a turning window: the same near-duplicate counts, statistics and level."""
    settings = ActivationMonitorSettings(window=16, rows_alert=50, rows_refuse=60)
    rng = np.random.default_rng(6)
    fast = Stream(window=np.zeros((16, 32), np.float32))
    general = Stream(window=np.zeros((16, 32), np.float32))
    previous = rng.standard_normal(32) * 10
    for step in range(120):
        kind = step % 4
        if kind == 0:  # far from everything
            row = rng.standard_normal(32) * 10
        elif kind == 1:  # a repeat: never a near duplicate
            row = previous.copy()
        else:  # a step of 0.02 units (in the band) or 0.07 (outside it)
            direction = rng.standard_normal(32)
            size = 0.02 if kind == 2 else 0.07
            row = previous + size * direction / np.linalg.norm(direction)
        evidence = one_row(row.astype(np.float32), float(rng.uniform(0, 6)), unit)
        fast.fold_one(evidence, settings, log_ratios(settings))
        near = general.near_duplicates(evidence, settings)
        general.update(evidence, near, settings)
        general.remember(evidence.projected)
        assert (fast.near, fast.outliers, fast.seen) == (
            general.near,
            general.outliers,
            general.seen,
        )
        assert (fast.shift, fast.rows) == pytest.approx((general.shift, general.rows))
        assert fast.level == general.level
        previous = row
    assert 0 < fast.near < fast.seen  # the band was hit, and only by the in-band steps
    np.testing.assert_array_equal(fast.window, general.window)


def test_fp16_rows_convert_as_numpy_converts_them() -> None:
    rows = np.random.default_rng(7).standard_normal((9, 40)).astype(np.float16)
    rows[0, :4] = [np.float16(6e-8), np.float16(-0.0), np.float16(65504), np.float16(0)]
    np.testing.assert_array_equal(as_float32(rows), rows.astype(np.float32))
    read_only = rows.copy()
    read_only.flags.writeable = False
    assert as_float32(read_only).dtype == np.float32
