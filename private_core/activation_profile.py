"""The private tier's reference profile of natural activations, computed by ``pack``.

``pack`` runs the front stage on the model's natural reference data, casts the activations to
the transport datatype (what the private tier receives) and keeps, per model:

* ``mean`` and a PCA ``basis`` (rows) with per-component ``variances``: the first ``whitened``
  components give a Mahalanobis distance, the squared residual outside them the rest;
* a ``bank`` of reference rows in PCA coordinates, for a nearest-neighbour distance (natural
  activations lie on clusters; noise with the reference's mean and covariance fills the gaps);
* per row statistic ("ood", "knn", "zero" = share of exact zeros, which post-ReLU activations
  have and noise lacks) its median and 1% / 99% quantiles on reference rows not in the bank;
* ``nn_scale``: the median distance from a reference row to its nearest other one, the unit of
  the near-duplicate (perturbation sweep) test;
* for convolutional activations (``channels`` > 0: one input shaped (batch, C, spatial...)), the
  mean and inverse covariance of each row's per-channel share of exact zeros ("pattern"): noise
  that matches the reference's mean and full covariance, clipped at 0, still has the wrong
  sparsity per channel (a ReLU zeroes whole regions of some channels, not scattered entries).

The file is ``activations.npz.enc`` in the model's private folder, sealed under the KEK like the
back stage (``shared.crypto``) and bound to the model name and the back stage's hash: a profile
that does not authenticate, or belongs to another model or pack, fails the model's load.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from shared.crypto import decrypt_bytes, encrypt_stream
from shared.keys import KeyProvider
from shared.manifest import DimSpec, StageManifest, TensorSpec

PROFILE_FILE = "activations.npz.enc"
PROFILE_VERSION = 2
READ_VERSIONS = (1, 2)  # version 1: no "pattern" (it scores 0)
STATISTICS = ("ood", "knn", "zero", "pattern")
FLOAT_DATATYPES = frozenset({"FP16", "FP32", "FP64"})
Floats = npt.NDArray[np.float32]


class ProfileError(ValueError):
    """A profile file is malformed or belongs to another model or pack."""


@dataclass(frozen=True)
class ActivationProfile:
    """Natural activations of one model in feature space (see the module docstring)."""

    mean: Floats  # (d,)
    basis: Floats  # (k, d), orthonormal rows
    variances: Floats  # (k,)
    whitened: int  # the first components used for the Mahalanobis part
    inside_scale: float
    residual_scale: float
    bank: Floats  # (n, k) PCA coordinates of reference rows
    quantiles: Floats  # (len(STATISTICS), 3): q01, median, q99 on held-back reference rows
    nn_scale: float
    channels: int = 0  # 0: no per-channel zero pattern
    pattern_mean: Floats = field(default_factory=lambda: np.zeros(0, np.float32))  # (channels,)
    pattern_inverse: Floats = field(  # (channels, channels)
        default_factory=lambda: np.zeros((0, 0), np.float32)
    )

    @cached_property
    def inverse_variances(self) -> Floats:
        """``1 / variances`` of the whitened components (cached: scoring is per request)."""
        return np.asarray(1.0 / self.variances[: self.whitened], dtype=np.float32)

    @cached_property
    def bank_t(self) -> Floats:
        """The bank transposed and contiguous, (k, n)."""
        return np.ascontiguousarray(self.bank.T)

    @cached_property
    def bank_norms(self) -> Floats:
        """Squared norm of each bank row, (n,)."""
        return np.asarray(np.einsum("ij,ij->i", self.bank, self.bank), dtype=np.float32)

    @property
    def dim(self) -> int:
        """Length of the feature vectors this profile describes."""
        return int(self.mean.shape[0])

    @property
    def zero_active(self) -> bool:
        """Whether exact zeros are typical of this model's activations (post-ReLU)."""
        low, median, high = self.quantiles[STATISTICS.index("zero")]
        return bool(median >= 0.02 and high > low)

    @property
    def pattern_active(self) -> bool:
        """Whether rows are scored on their per-channel share of zeros."""
        return self.channels > 0 and self.zero_active


def channel_groups(specs: Sequence[TensorSpec]) -> int:
    """Channels of the one floating front input shaped (batch, C, spatial...), else 0."""
    floats = [
        spec
        for spec in specs
        if spec.datatype in FLOAT_DATATYPES and (spec.source or "").startswith("front:")
    ]
    if len(floats) != 1 or len(floats[0].shape) < 4:
        return 0
    dims = floats[0].shape[1:]
    return dims[0] if all(isinstance(dim, int) for dim in dims) else 0  # type: ignore[return-value]


def features_of(arrays: Mapping[str, Any], specs: Sequence[TensorSpec]) -> Floats:
    """One float32 vector per sample, (batch, d), from the back-stage inputs the front sent.

    Floating inputs with a ``front:`` source only; a dynamic dimension after the batch (a
    sequence) is mean-pooled first, over the positions its mask keeps when the request carries
    one (an integer input shaped like its first two dimensions, e.g. MiniLM's attention mask),
    so that padding does not move a row.
    """
    parts: list[Floats] = []
    for spec in specs:
        if spec.datatype not in FLOAT_DATATYPES or not (spec.source or "").startswith("front:"):
            continue
        array = np.asarray(arrays[spec.name])
        if any(isinstance(dim, DimSpec) for dim in spec.shape[1:]):
            array = _pooled(array, _mask_for(spec, specs, arrays))
        parts.append(np.asarray(array, dtype=np.float32).reshape(array.shape[0], -1))
    if not parts:
        raise ValueError("the back stage takes no floating activation from the front")
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)


def _mask_for(
    spec: TensorSpec, specs: Sequence[TensorSpec], arrays: Mapping[str, Any]
) -> npt.NDArray[Any] | None:
    """The integer input shaped like ``spec``'s batch and sequence dimensions, if any."""
    for other in specs:
        if other.datatype in FLOAT_DATATYPES or other.name not in arrays:
            continue
        if list(other.shape) == list(spec.shape[:2]):
            return np.asarray(arrays[other.name])
    return None


def _pooled(array: npt.NDArray[Any], mask: npt.NDArray[Any] | None) -> Floats:
    """Mean over axis 1 in float32, over the positions ``mask`` keeps (all without one)."""
    if mask is None or mask.shape != array.shape[:2]:
        return np.asarray(array.mean(axis=1, dtype=np.float32), dtype=np.float32)
    keep = (mask != 0).reshape(*mask.shape, *([1] * (array.ndim - 2)))
    total = array.sum(axis=1, dtype=np.float32, where=keep)
    counts = np.maximum(np.count_nonzero(keep, axis=1), 1)
    return np.asarray(total / counts, dtype=np.float32)


def build_profile(
    features: npt.NDArray[Any],
    *,
    components: int = 32,
    whitened: int = 16,
    bank: int = 1024,
    channels: int = 0,
) -> ActivationProfile:
    """Profile of natural reference features (n, d); n should be a few hundred or more.
    ``channels``: see ``channel_groups`` (0 when the rows have no channel layout)."""
    data = np.asarray(features, dtype=np.float64)
    if data.ndim != 2 or len(data) < 4 * whitened:
        raise ValueError(f"need (n, d) features with n >= {4 * whitened}, got {data.shape}")
    order = np.random.default_rng(0).permutation(len(data))
    size = min(bank, len(data) // 2)
    banked, held = data[order[:size]], data[order[size:]]
    mean = data.mean(axis=0)
    _, singular, vectors = np.linalg.svd(data - mean, full_matrices=False)
    k = min(components, vectors.shape[0])
    variances = np.maximum(singular[:k] ** 2 / (len(data) - 1), 1e-12)
    unit = ActivationProfile(
        mean=mean.astype(np.float32),
        basis=vectors[:k].astype(np.float32),
        variances=variances.astype(np.float32),
        whitened=min(whitened, k),
        inside_scale=1.0,
        residual_scale=1.0,
        bank=np.zeros((0, k), np.float32),
        quantiles=np.ones((len(STATISTICS), 3), np.float32),
        nn_scale=1.0,
    )
    held32 = held.astype(np.float32)
    inside, outside = mahalanobis_parts(unit, held32)
    scaled = _replace(
        unit,
        inside_scale=max(float(np.quantile(inside, 0.99)), 1e-12),
        residual_scale=max(float(np.quantile(outside, 0.99)), 1e-12),
        bank=coordinates(unit, banked.astype(np.float32)),
        nn_scale=_median_nearest(data),
        **_zero_pattern(banked, channels),
    )
    raw = raw_statistics(scaled, held32)
    quantiles = np.quantile(raw, [0.01, 0.5, 0.99], axis=0).T.astype(np.float32)
    return _replace(scaled, quantiles=quantiles)


def _zero_pattern(rows: npt.NDArray[np.float64], channels: int) -> dict[str, Any]:
    """Mean and inverse covariance (ridged) of the rows' per-channel shares of zeros."""
    if channels < 2 or rows.shape[1] % channels:
        return {}
    shares = (rows == 0).reshape(len(rows), channels, -1).mean(axis=2)
    covariance = np.atleast_2d(np.cov(shares.T))
    covariance += np.eye(channels) * max(1e-3 * float(np.trace(covariance)) / channels, 1e-6)
    return {
        "channels": channels,
        "pattern_mean": shares.mean(axis=0).astype(np.float32),
        "pattern_inverse": np.linalg.inv(covariance).astype(np.float32),
    }


def coordinates(profile: ActivationProfile, features: Floats) -> Floats:
    """PCA coordinates of each row, (batch, k)."""
    return np.asarray((features - profile.mean) @ profile.basis.T, dtype=np.float32)


def mahalanobis_parts(
    profile: ActivationProfile,
    features: Floats,
    coords: Floats | None = None,
    centred: Floats | None = None,
) -> tuple[Floats, Floats]:
    """Squared Mahalanobis distance in the first ``whitened`` components; squared residual."""
    if centred is None:
        centred = features - profile.mean
    if coords is None:
        coords = np.asarray(centred @ profile.basis.T, dtype=np.float32)
    inner = coords[:, : profile.whitened]
    inner = inner * inner
    inside = inner @ profile.inverse_variances
    residual = np.maximum(np.einsum("ij,ij->i", centred, centred) - inner.sum(axis=1), 0)
    return inside, residual


def raw_statistics(
    profile: ActivationProfile,
    features: Floats,
    centred: Floats | None = None,
    coords: Floats | None = None,
) -> Floats:
    """Per row: OOD distance, nearest-neighbour distance to the bank, share of zeros and the
    Mahalanobis distance of its per-channel shares of zeros (0 without channels); (n, 4).

    Called on every request's rows: few NumPy calls, the bank's norms computed once; a caller
    that has the centred rows and their PCA coordinates already passes them.
    """
    out = np.empty((len(features), len(STATISTICS)), np.float32)
    if centred is None:
        centred = features - profile.mean
    if coords is None:
        coords = np.asarray(centred @ profile.basis.T, dtype=np.float32)
    inside, outside = mahalanobis_parts(profile, features, coords, centred)
    np.maximum(inside / profile.inside_scale, outside / profile.residual_scale, out=out[:, 0])
    squared = coords @ profile.bank_t
    squared *= -2.0
    squared += np.einsum("ij,ij->i", coords, coords)[:, None]
    squared += profile.bank_norms
    if squared.shape[1] > 3:
        squared = np.partition(squared, 2, axis=1)[:, :3]
    np.maximum(squared, 0.0, out=squared)
    out[:, 1] = np.sqrt(squared, out=squared).mean(axis=1)
    zeros = features == 0
    out[:, 2] = np.count_nonzero(zeros, axis=1) / max(features.shape[1], 1)
    if profile.channels:
        shares = zeros.reshape(len(features), profile.channels, -1).mean(axis=2, dtype=np.float32)
        shares -= profile.pattern_mean
        out[:, 3] = np.einsum("ij,ij->i", shares @ profile.pattern_inverse, shares)
    else:
        out[:, 3] = 0.0
    return out


def _median_nearest(data: npt.NDArray[np.float64], limit: int = 2048) -> float:
    rows = data[:limit].astype(np.float32)
    norms = np.einsum("ij,ij->i", rows, rows)
    squared = norms[:, None] + norms[None, :] - 2.0 * rows @ rows.T
    np.fill_diagonal(squared, np.inf)
    nearest = np.sqrt(np.maximum(squared.min(axis=1), 0.0))
    return max(float(np.median(nearest)), 1e-6)


def _replace(profile: ActivationProfile, **changes: Any) -> ActivationProfile:
    values = {field.name: getattr(profile, field.name) for field in fields(profile)}
    return ActivationProfile(**{**values, **changes})


def save_profile(
    profile: ActivationProfile, path: Path, provider: KeyProvider, *, model: str, back_sha256: str
) -> None:
    """Seal the profile under the KEK, bound to ``model`` and its back stage's hash."""
    arrays = {field.name: np.asarray(getattr(profile, field.name)) for field in fields(profile)}
    buffer = io.BytesIO()
    arrays.update(
        version=np.asarray(PROFILE_VERSION),
        model=np.asarray(model),
        back_sha256=np.asarray(back_sha256),
    )
    np.savez(buffer, **arrays)  # type: ignore[arg-type]  # numpy's stub: allow_pickle in kwargs
    sealed = io.BytesIO()
    encrypt_stream(buffer.getvalue(), sealed, provider)
    partial = path.with_name(path.name + ".partial")
    try:
        partial.write_bytes(sealed.getvalue())
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)


def load_profile(path: Path, provider: KeyProvider, manifest: StageManifest) -> ActivationProfile:
    """Open a sealed profile of ``manifest``'s model; ``DecryptionError`` or ``ProfileError``."""
    plaintext = decrypt_bytes(path.read_bytes(), provider)
    try:
        with np.load(io.BytesIO(plaintext), allow_pickle=False) as data:
            found = {name: data[name] for name in data.files}
    except (OSError, ValueError) as error:
        raise ProfileError(f"{path.name} is not a profile ({error})") from None
    version = int(found["version"]) if "version" in found else 0
    names = {
        "version",
        "model",
        "back_sha256",
        *(item.name for item in fields(ActivationProfile) if version >= 2 or item.name in V1),
    }
    if names - set(found) or version not in READ_VERSIONS:
        raise ProfileError(f"{path.name}: not a version {READ_VERSIONS} activation profile")
    if str(found["model"]) != manifest.model or str(found["back_sha256"]) != manifest.sha256:
        raise ProfileError(f"{path.name} belongs to another model or an earlier pack")
    floats = {
        name: found[name].astype(np.float32) for name in ("mean", "basis", "variances", "bank")
    }
    profile = ActivationProfile(
        **floats,
        whitened=int(found["whitened"]),
        inside_scale=float(found["inside_scale"]),
        residual_scale=float(found["residual_scale"]),
        quantiles=_padded(found["quantiles"].astype(np.float32)),
        nn_scale=float(found["nn_scale"]),
        **_pattern_fields(found, version),
    )
    channels = profile.channels
    if (
        profile.basis.shape[1] != profile.dim
        or profile.bank.shape[1] != profile.basis.shape[0]
        or (
            channels
            and (profile.dim % channels or profile.pattern_inverse.shape != (channels,) * 2)
        )
    ):
        raise ProfileError(f"{path.name}: inconsistent shapes")
    return profile


V1 = frozenset(
    {"mean", "basis", "variances", "whitened", "inside_scale", "residual_scale", "bank"}
    | {"quantiles", "nn_scale"}
)


def _pattern_fields(found: Mapping[str, Any], version: int) -> dict[str, Any]:
    """The zero-pattern fields of a version 2 profile; a version 1 profile has none."""
    if version < 2:
        return {}
    return {
        "channels": int(found["channels"]),
        "pattern_mean": found["pattern_mean"].astype(np.float32),
        "pattern_inverse": found["pattern_inverse"].astype(np.float32),
    }


def _padded(quantiles: Floats) -> Floats:
    """Version 1 quantiles with a row for "pattern" (never scored: no channels)."""
    missing = len(STATISTICS) - len(quantiles)
    return np.concatenate([quantiles, np.ones((missing, 3), np.float32)]) if missing else quantiles
