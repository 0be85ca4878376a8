"""The one tensor codec: Open Inference Protocol v2 datatypes, JSON data and raw-bytes tensors.

REST requests carry JSON numbers, or raw bytes with the binary tensor data extension; the v2
gRPC ingress carries raw bytes or typed contents; the hop between the tiers carries raw
little-endian bytes. All decode to NumPy arrays here, with every check a hostile client could
trip turned into ``InvalidInput``. ``BYTES`` tensors (the classification answers) are encoded
here too: each element a 4-byte little-endian length, then its bytes.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from protos import inference_pb2
from shared.errors import InvalidInput, PayloadTooLarge

_NUMPY_BY_DATATYPE: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
_DATATYPE_BY_KIND_SIZE = {(dt.kind, dt.itemsize): name for name, dt in _NUMPY_BY_DATATYPE.items()}
NUMERIC_DATATYPES = frozenset(_NUMPY_BY_DATATYPE)
# More dimensions than any model input has; NumPy itself stops at 64 (with a ValueError).
MAX_RANK = 32


def numpy_dtype(datatype: str) -> np.dtype[Any]:
    """Return the NumPy dtype of a v2 datatype name, or raise ``InvalidInput``."""
    try:
        return _NUMPY_BY_DATATYPE[datatype]
    except KeyError:
        known = ", ".join(sorted(_NUMPY_BY_DATATYPE))
        raise InvalidInput(f"unsupported datatype {datatype!r}; expected one of {known}") from None


def datatype_of(dtype: npt.DTypeLike) -> str:
    """Return the v2 datatype name of a NumPy dtype."""
    dt = np.dtype(dtype)
    try:
        return _DATATYPE_BY_KIND_SIZE[(dt.kind, dt.itemsize)]
    except KeyError:
        raise ValueError(f"no v2 datatype for NumPy dtype {dt}") from None


def element_count(shape: Sequence[int]) -> int:
    """Number of elements of a shape (1 for a scalar)."""
    return math.prod(shape)


def array_from_json(data: Any, datatype: str, shape: Sequence[int], *, max_elements: int) -> Any:
    """Decode v2 JSON ``data`` (flat or nested, row-major) into an array of ``shape``.

    Refuses non-numeric values, floats sent for an integer type, element counts that do not
    match the shape, and non-finite floats.
    """
    dtype = numpy_dtype(datatype)
    if any(d < 0 for d in shape):
        raise InvalidInput(f"shape {list(shape)} has a negative dimension")
    expected = element_count(shape)
    if expected > max_elements:
        raise PayloadTooLarge(f"shape {list(shape)} has {expected} elements; limit {max_elements}")
    if isinstance(data, list) and len(data) > max_elements:  # refused before NumPy copies it
        raise PayloadTooLarge(f"data has {len(data)} values; limit {max_elements}")
    try:
        raw = np.asarray(data)
    except (ValueError, TypeError):
        raise InvalidInput("data is not a rectangular array of numbers") from None
    if raw.size > max_elements:
        raise PayloadTooLarge(f"data has {raw.size} elements; limit {max_elements}")
    if raw.dtype.kind not in "biuf":
        raise InvalidInput(f"data must be numbers for datatype {datatype}")
    if raw.size != expected:
        raise InvalidInput(f"data has {raw.size} elements but shape {list(shape)} needs {expected}")
    if dtype.kind in "iu" and raw.dtype.kind == "f":
        raise InvalidInput(f"datatype {datatype} needs integers; got non-integer numbers")
    if (
        dtype.kind in "iu"
        and raw.size
        and (raw.min() < np.iinfo(dtype).min or raw.max() > np.iinfo(dtype).max)
    ):
        raise InvalidInput(f"a value is outside the range of {datatype}")
    with np.errstate(over="ignore"):  # a float too large for FP16 becomes inf, refused below
        array = raw.astype(dtype, copy=False).reshape(tuple(shape))
    if dtype.kind == "f" and not np.isfinite(array).all():
        raise InvalidInput("data holds NaN or infinite values")
    return array


def array_from_bytes(
    data: bytes | memoryview, datatype: str, shape: Sequence[int], *, max_elements: int
) -> Any:
    """Decode a client's raw tensor (little-endian, row-major) of ``shape``, without copying.

    Refuses what ``array_from_json`` refuses: sizes over ``max_elements``, a byte count that
    does not match the shape, and non-finite floats.
    """
    dtype = numpy_dtype(datatype)
    _check_shape(shape, max_elements)
    expected = element_count(shape) * dtype.itemsize
    if len(data) != expected:
        raise InvalidInput(
            f"{len(data)} bytes of data but shape {list(shape)} of {datatype} needs {expected}"
        )
    array = np.frombuffer(data, dtype=dtype).reshape(tuple(shape))
    if dtype.kind == "f" and not np.isfinite(array).all():
        raise InvalidInput("data holds NaN or infinite values")
    return array


def _check_shape(shape: Sequence[int], max_elements: int) -> None:
    if len(shape) > MAX_RANK:
        raise InvalidInput(f"{len(shape)} dimensions; at most {MAX_RANK} are allowed")
    if any(d < 0 for d in shape):
        raise InvalidInput(f"shape {list(shape)} has a negative dimension")
    if element_count(shape) > max_elements:
        raise PayloadTooLarge(
            f"shape {list(shape)} has {element_count(shape)} elements; limit {max_elements}"
        )


def raw_bytes(array: Any) -> bytes:
    """An array as raw tensor bytes: little-endian, row-major, in its v2 datatype."""
    arr = np.asarray(array)
    return np.asarray(arr, dtype=_NUMPY_BY_DATATYPE[datatype_of(arr.dtype)], order="C").tobytes()


def bytes_tensor(elements: Iterable[str | bytes]) -> bytes:
    """A v2 ``BYTES`` tensor as raw bytes: each element's length (4 bytes, little-endian), then
    the element (strings as UTF-8)."""
    parts = []
    for element in elements:
        data = element.encode() if isinstance(element, str) else element
        parts += [struct.pack("<I", len(data)), data]
    return b"".join(parts)


def elements_from_bytes(data: bytes | memoryview) -> list[bytes]:
    """The elements of a raw v2 ``BYTES`` tensor (the inverse of ``bytes_tensor``)."""
    view, offset = memoryview(data), 0
    elements: list[bytes] = []
    while offset < len(view):
        if offset + 4 > len(view):
            raise InvalidInput(f"BYTES data ends inside an element's length, at byte {offset}")
        (length,) = struct.unpack_from("<I", view, offset)
        offset += 4
        if offset + length > len(view):
            raise InvalidInput(f"BYTES element {len(elements)} runs past the end of the data")
        elements.append(bytes(view[offset : offset + length]))
        offset += length
    return elements


def to_proto(name: str, array: Any) -> inference_pb2.Tensor:
    """Encode an array as a raw-bytes tensor (little-endian, row-major)."""
    arr = np.asarray(array)
    datatype = datatype_of(arr.dtype)
    # ``asarray`` (not ``ascontiguousarray``, which makes a scalar 1-D) keeps the shape.
    contiguous = np.asarray(arr, dtype=_NUMPY_BY_DATATYPE[datatype], order="C")
    return inference_pb2.Tensor(
        name=name, datatype=datatype, shape=list(contiguous.shape), data=contiguous.tobytes()
    )


def from_proto(tensor: inference_pb2.Tensor) -> Any:
    """Decode a raw-bytes tensor without copying, checking its length against shape and dtype."""
    dtype = numpy_dtype(tensor.datatype)
    shape = tuple(tensor.shape)
    if len(shape) > MAX_RANK:
        raise InvalidInput(
            f"tensor {tensor.name!r}: {len(shape)} dimensions; at most {MAX_RANK} are allowed"
        )
    if any(d < 0 for d in shape):
        raise InvalidInput(f"tensor {tensor.name!r}: negative dimension in shape {list(shape)}")
    expected = element_count(shape) * dtype.itemsize
    if len(tensor.data) != expected:
        raise InvalidInput(
            f"tensor {tensor.name!r}: {len(tensor.data)} bytes but shape {list(shape)} "
            f"of {tensor.datatype} needs {expected}"
        )
    return np.frombuffer(tensor.data, dtype=dtype).reshape(shape)
