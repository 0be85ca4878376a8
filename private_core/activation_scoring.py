"""The activation monitor's per-row statistics with few NumPy calls (``RowStatistics``).

The same four statistics as ``activation_profile.raw_statistics`` (which ``pack`` uses to set the
profile's quantiles), rearranged for the private tier's hot path, where a batch holds a few
single-row requests and each NumPy call costs microseconds whatever its size: every constant is
folded into matrices once per model, so that one product of the centred rows gives the PCA
coordinates and the secret projection, one product of their squares the Mahalanobis parts and
the squared norm, one product of the zero mask the share of zeros and the whitened per-channel
zero pattern, and the nearest reference rows are ranked before adding each row's own norm.
"""

from __future__ import annotations

from typing import cast

import numpy as np
import numpy.typing as npt

from private_core.activation_profile import STATISTICS, ActivationProfile, Floats

OOD, KNN, ZERO, PATTERN = (STATISTICS.index(name) for name in STATISTICS)
NEAREST = 3  # reference rows averaged for the nearest-neighbour distance


class RowStatistics:
    """``raw_statistics`` of one profile, and the rows' secret projection, per group of rows."""

    def __init__(self, profile: ActivationProfile, projection: Floats) -> None:
        k, whitened = profile.basis.shape[0], profile.whitened
        self.nn_scale = profile.nn_scale
        self._mean = profile.mean
        self._components = k
        # PCA coordinates and the secret projection in one product of the centred rows.
        self._fused = np.ascontiguousarray(
            np.concatenate([profile.basis.T, projection], axis=1), dtype=np.float32
        )
        # Squared coordinates -> (Mahalanobis part / inside_scale, inner energy, squared norm).
        squares = np.zeros((k, 3), np.float32)
        squares[:whitened, 0] = profile.inverse_variances / profile.inside_scale
        squares[:whitened, 1] = 1.0
        squares[:, 2] = 1.0
        self._squares = squares
        self._inverse_residual = np.float32(1.0 / profile.residual_scale)
        # Distances to the bank as -2 c.b + |b|^2; each row's |c|^2 is added to its nearest only.
        self._bank = np.ascontiguousarray(-2.0 * profile.bank_t, dtype=np.float32)
        self._bank_norms = profile.bank_norms
        self._zeros, self._offset = _zero_matrix(profile)
        self._channels = profile.channels

    def unit(self, rows: int) -> Floats:
        """The near-duplicate unit of ``rows`` rows (the profile's nearest-neighbour distance)."""
        return np.full(rows, self.nn_scale, np.float32)

    def raw(self, features: Floats) -> tuple[Floats, Floats]:
        """(n, 4) raw statistics of ``features`` rows, and their (n, P) secret projection."""
        out = np.empty((len(features), len(STATISTICS)), np.float32)
        centred = features - self._mean
        fused = cast(Floats, centred @ self._fused)
        coords, projected = fused[:, : self._components], fused[:, self._components :]
        parts = np.square(coords) @ self._squares
        residual = np.einsum("ij,ij->i", centred, centred)
        residual -= parts[:, 1]
        residual *= self._inverse_residual  # max with a non-negative part: no clip needed
        np.maximum(parts[:, 0], residual, out=out[:, OOD])
        self._nearest(coords, parts[:, 2], out[:, KNN])
        zeros = np.matmul(features == 0, self._zeros)
        out[:, ZERO] = zeros[:, -1]
        if self._channels:
            pattern = zeros[:, :-1]
            pattern -= self._offset
            np.einsum("ij,ij->i", pattern, pattern, out=out[:, PATTERN])
        else:
            out[:, PATTERN] = 0.0
        return out, projected

    def _nearest(self, coords: Floats, norms: Floats, out: Floats) -> None:
        """Mean distance of each row to its ``NEAREST`` nearest bank rows, into ``out``."""
        squared = coords @ self._bank
        squared += self._bank_norms
        if squared.shape[1] > NEAREST:
            squared = np.partition(squared, NEAREST - 1, axis=1)[:, :NEAREST]
        squared += norms[:, None]
        np.maximum(squared, 0.0, out=squared)
        np.sqrt(squared, out=squared)
        np.add.reduce(squared, axis=1, out=out)
        out /= squared.shape[1]


def _zero_matrix(profile: ActivationProfile) -> tuple[Floats, Floats]:
    """(d, C + 1): the zero mask's product gives the whitened per-channel shares of zeros (up to
    the returned offset) and, last, the share of zeros; (C,) offset. The pattern's Mahalanobis
    form ``s A s'`` is ``|s L|^2`` with ``A = L L'`` (from its eigendecomposition)."""
    d, channels = profile.dim, profile.channels
    matrix = np.zeros((d, channels + 1), np.float64)
    matrix[:, -1] = 1.0 / max(d, 1)
    if not channels:
        return matrix.astype(np.float32), np.zeros(0, np.float32)
    values, vectors = np.linalg.eigh(np.asarray(profile.pattern_inverse, np.float64))
    factor: npt.NDArray[np.float64] = vectors * np.sqrt(np.maximum(values, 0.0))
    width = d // channels
    shares = np.kron(np.eye(channels), np.full((width, 1), 1.0 / width))  # (d, C)
    matrix[:, :-1] = shares @ factor
    offset = np.asarray(profile.pattern_mean, np.float64) @ factor
    return matrix.astype(np.float32), offset.astype(np.float32)
