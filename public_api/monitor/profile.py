"""Statistics of natural data in front-activation space, computed at pack time.

``pack`` runs the front stage on natural reference data (the training set), turns each sample's
activations into a fixed-size feature vector with ``features_of`` and keeps a small profile:

* ``mean`` and a PCA basis (``components``, rows) with per-component ``variances``;
* ``inside_scale`` and ``residual_scale``: the ``quantile`` of the reference's squared
  Mahalanobis distance within the basis and of its squared residual outside it (shifted or
  rotated inputs mostly show in the residual, odd mixtures of natural features inside);
* ``ood_threshold``: the ``quantile`` of the reference samples' own OOD distances (the larger
  of the two parts, each over its scale), so about 1% of natural data lies beyond it;
* ``grid_edges``: quantile edges of the first whitened components, which cut activation space
  into ``bins ** grid_dims`` cells; ``cell_counts`` says how many reference samples fell in each.

Saved with ``np.savez`` and read with ``allow_pickle=False``: the file holds arrays only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
import numpy.typing as npt

from shared.manifest import DimSpec, TensorSpec

Floats = npt.NDArray[np.float32]
FLOAT_DATATYPES = frozenset({"FP16", "FP32", "FP64", "BF16"})
PROFILE_VERSION = 1


@dataclass(frozen=True)
class ReferenceProfile:
    """Natural data in feature space: PCA, an OOD threshold and a coarse grid of cells."""

    mean: Floats  # (d,)
    components: Floats  # (k, d), orthonormal rows
    variances: Floats  # (k,)
    inside_scale: float
    residual_scale: float
    ood_threshold: float
    ood_quantile: float
    grid_edges: Floats  # (grid_dims, bins - 1) on whitened components
    cell_counts: npt.NDArray[np.int32]  # (bins ** grid_dims,)

    @property
    def dim(self) -> int:
        """Length of the feature vectors this profile describes."""
        return int(self.mean.shape[0])

    @property
    def cells(self) -> int:
        """Number of grid cells."""
        return int(self.cell_counts.shape[0])

    @property
    def occupied_cells(self) -> int:
        """Cells that hold at least one reference sample."""
        return int(np.count_nonzero(self.cell_counts))

    def whiten(self, features: Floats) -> Floats:
        """PCA coordinates divided by their standard deviations, (batch, k)."""
        coords = (features - self.mean) @ self.components.T
        return np.asarray(coords / np.sqrt(self.variances), dtype=np.float32)

    def ood_distances(self, features: Floats) -> Floats:
        """How far each sample lies from the reference (1 = at the ``quantile`` of each part)."""
        inside, outside = self._parts(features)
        larger = np.maximum(inside / self.inside_scale, outside / self.residual_scale)
        return np.asarray(larger, dtype=np.float32)

    def _parts(self, features: Floats) -> tuple[Floats, Floats]:
        """Squared Mahalanobis distance in the PCA subspace, squared residual outside it."""
        centred = features - self.mean
        coords = centred @ self.components.T
        inside = np.sum(coords**2 / self.variances, axis=1)
        residual = np.maximum(np.sum(centred**2, axis=1) - np.sum(coords**2, axis=1), 0.0)
        return inside, residual

    def cell_of(self, features: Floats) -> npt.NDArray[np.int64]:
        """Index of the grid cell of each sample."""
        dims, cuts = self.grid_edges.shape
        white = self.whiten(features)[:, :dims]
        digits = np.stack(
            [np.searchsorted(self.grid_edges[i], white[:, i]) for i in range(dims)], axis=1
        )
        weights = (cuts + 1) ** np.arange(dims)
        return np.asarray(digits @ weights, dtype=np.int64)


def features_of(activations: Mapping[str, np.ndarray], specs: Sequence[TensorSpec]) -> Floats:
    """One float32 feature vector per sample, (batch, d), from the front stage's outputs.

    Floating outputs only; a tensor with a fixed per-sample shape is flattened, one with a
    dynamic dimension after the batch (a sequence) is mean-pooled over axis 1 first.
    """
    parts: list[Floats] = []
    for spec in specs:
        if spec.datatype not in FLOAT_DATATYPES:
            continue
        array = np.asarray(activations[spec.name], dtype=np.float32)
        if any(isinstance(dim, DimSpec) for dim in spec.shape[1:]):
            array = array.mean(axis=1)
        parts.append(array.reshape(array.shape[0], -1))
    if not parts:
        raise ValueError("the front stage has no floating output to profile")
    return np.concatenate(parts, axis=1)


def build_profile(
    features: np.ndarray,
    *,
    components: int = 16,
    quantile: float = 0.99,
    grid_dims: int = 4,
    bins: int = 5,
) -> ReferenceProfile:
    """Profile of natural reference features (n, d); n should be a few hundred or more."""
    data = np.asarray(features, dtype=np.float64)
    if data.ndim != 2 or data.shape[0] < 2 * components:
        raise ValueError(f"need (n, d) features with n >= {2 * components}, got {data.shape}")
    mean = data.mean(axis=0)
    _, singular, basis = np.linalg.svd(data - mean, full_matrices=False)
    k = min(components, basis.shape[0])
    variances = np.maximum(singular[:k] ** 2 / (len(data) - 1), 1e-12)
    floats = data.astype(np.float32)
    unit = ReferenceProfile(
        mean=mean.astype(np.float32),
        components=basis[:k].astype(np.float32),
        variances=variances.astype(np.float32),
        inside_scale=1.0,
        residual_scale=1.0,
        ood_threshold=0.0,
        ood_quantile=quantile,
        grid_edges=np.zeros((min(grid_dims, k), bins - 1), dtype=np.float32),
        cell_counts=np.zeros(bins ** min(grid_dims, k), dtype=np.int32),
    )
    inside, outside = unit._parts(floats)
    partial = replace(
        unit,
        inside_scale=max(float(np.quantile(inside, quantile)), 1e-12),
        residual_scale=max(float(np.quantile(outside, quantile)), 1e-12),
    )
    white = partial.whiten(floats)[:, : min(grid_dims, k)]
    cuts = np.linspace(0.0, 1.0, bins + 1)[1:-1]
    edges = np.quantile(white, cuts, axis=0).T.astype(np.float32)
    with_edges = replace(partial, grid_edges=edges)
    counts = np.bincount(with_edges.cell_of(floats), minlength=with_edges.cells)
    threshold = float(np.quantile(with_edges.ood_distances(floats), quantile))
    return replace(with_edges, cell_counts=counts.astype(np.int32), ood_threshold=threshold)


def save_profile(profile: ReferenceProfile, path: Path) -> None:
    """Write the profile as a ``.npz`` of plain arrays."""
    arrays = {field.name: np.asarray(getattr(profile, field.name)) for field in fields(profile)}
    arrays["version"] = np.asarray(PROFILE_VERSION)
    with Path(path).open("wb") as out:
        np.savez(out, **arrays)  # type: ignore[arg-type]  # numpy's stub: allow_pickle in kwargs


def load_profile(path: Path) -> ReferenceProfile:
    """Read a profile written by ``save_profile`` (no pickle; ``ValueError`` if malformed)."""
    with np.load(Path(path), allow_pickle=False) as data:
        missing = {"version", *(field.name for field in fields(ReferenceProfile))} - set(data)
        if missing:
            raise ValueError(f"{path} is not a reference profile: no {', '.join(sorted(missing))}")
        version = int(data["version"])
        if version != PROFILE_VERSION:
            raise ValueError(f"{path}: profile version {version}, expected {PROFILE_VERSION}")
        return ReferenceProfile(
            mean=data["mean"].astype(np.float32),
            components=data["components"].astype(np.float32),
            variances=data["variances"].astype(np.float32),
            inside_scale=float(data["inside_scale"]),
            residual_scale=float(data["residual_scale"]),
            ood_threshold=float(data["ood_threshold"]),
            ood_quantile=float(data["ood_quantile"]),
            grid_edges=data["grid_edges"].astype(np.float32),
            cell_counts=data["cell_counts"].astype(np.int32),
        )
