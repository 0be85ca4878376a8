"""Check tensors against a manifest's specs; both tiers refuse bad tensors the same way."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from shared.errors import InvalidInput
from shared.manifest import DimSpec, TensorSpec
from shared.tensor_codec import numpy_dtype

# What may arrive for a floating-point input: activations travel as FP16 by default.
_FLOAT_TRANSPORTS = frozenset({"FP16", "FP32", "FP64"})


def check_tensors(
    specs: Sequence[TensorSpec],
    tensors: Mapping[str, Any],
    *,
    float_transport: bool = False,
) -> dict[str, int]:
    """Check names, datatypes, shapes and value ranges; return the size of each named dim.

    With ``float_transport``, a floating-point input may arrive in any float datatype (it is
    cast to the spec's datatype before use).
    """
    expected = [spec.name for spec in specs]
    if sorted(tensors) != sorted(expected):
        raise InvalidInput(f"inputs must be exactly {expected}; got {sorted(tensors)}")
    sizes: dict[str, int] = {}
    for spec in specs:
        array = tensors[spec.name]
        _check_datatype(spec, array, float_transport)
        _check_shape(spec, array.shape, sizes)
        _check_range(spec, array)
    return sizes


def _check_datatype(spec: TensorSpec, array: Any, float_transport: bool) -> None:
    want = numpy_dtype(spec.datatype)
    if array.dtype == want:
        return
    if float_transport and want.kind == "f" and array.dtype.kind == "f":
        return
    raise InvalidInput(f"input {spec.name!r} must have datatype {spec.datatype}")


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
