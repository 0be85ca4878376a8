"""Check tensors against a manifest's specs; both tiers refuse bad tensors the same way."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from shared.errors import InvalidInput
from shared.manifest import DimSpec, TensorSpec
from shared.tensor_codec import numpy_dtype

FRONT_SOURCE = "front:"  # a back-stage input computed by the front stage (an activation)


def check_tensors(
    specs: Sequence[TensorSpec],
    tensors: Mapping[str, Any],
    *,
    transport: str | None = None,
) -> dict[str, int]:
    """Check names, datatypes, shapes and value ranges; return the size of each named dim.

    ``transport``: the model's transport datatype, for a back stage's inputs as they cross
    the wire: a floating-point activation must arrive in exactly that datatype, any other
    input in its spec's, and every float value must be finite (the private tier checks what
    the public tier sends as if that tier were compromised).
    """
    expected = [spec.name for spec in specs]
    if sorted(tensors) != sorted(expected):
        raise InvalidInput(f"inputs must be exactly {expected}; got {sorted(tensors)}")
    sizes: dict[str, int] = {}
    for spec in specs:
        array = tensors[spec.name]
        _check_datatype(spec, array, transport)
        _check_shape(spec, array.shape, sizes)
        _check_range(spec, array)
        if transport is not None:
            _check_finite(spec, array)
    return sizes


def wire_datatype(spec: TensorSpec, transport: str) -> str:
    """The datatype a back-stage input crosses the wire in: activations travel as ``transport``."""
    is_float = numpy_dtype(spec.datatype).kind == "f"
    from_front = spec.source is None or spec.source.startswith(FRONT_SOURCE)
    return transport if is_float and from_front else spec.datatype


def _check_datatype(spec: TensorSpec, array: Any, transport: str | None) -> None:
    want = spec.datatype if transport is None else wire_datatype(spec, transport)
    if array.dtype != numpy_dtype(want):
        raise InvalidInput(f"input {spec.name!r} must have datatype {want}")


def _check_finite(spec: TensorSpec, array: Any) -> None:
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise InvalidInput(f"input {spec.name!r} holds NaN or infinite values")


def _check_shape(spec: TensorSpec, shape: tuple[int, ...], sizes: dict[str, int]) -> None:
    if len(shape) != len(spec.shape):
        raise InvalidInput(
            f"input {spec.name!r} must have {len(spec.shape)} dimensions; got {list(shape)}"
        )
    for index, (size, dim) in enumerate(zip(shape, spec.shape, strict=True)):
        if isinstance(dim, int):
            if size != dim:
                raise InvalidInput(
                    f"input {spec.name!r} dimension {index} must be {dim}; got {size}"
                )
            continue
        _check_dim(spec.name, dim, size, sizes)


def _check_dim(name: str, dim: DimSpec, size: int, sizes: dict[str, int]) -> None:
    if not dim.min <= size <= dim.max:
        raise InvalidInput(
            f"input {name!r}: {dim.name} must be in [{dim.min}, {dim.max}]; got {size}"
        )
    if sizes.setdefault(dim.name, size) != size:
        raise InvalidInput(
            f"input {name!r}: {dim.name} is {size} but another input has {sizes[dim.name]}"
        )


def _check_range(spec: TensorSpec, array: Any) -> None:
    if spec.value_range is None or array.size == 0:
        return
    low, high = spec.value_range
    if int(np.min(array)) < low or int(np.max(array)) > high:
        raise InvalidInput(f"input {spec.name!r} values must be in [{low}, {high}]")
