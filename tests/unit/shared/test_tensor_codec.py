"""The tensor codec: v2 datatypes, raw-bytes tensors and hostile JSON data."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from protos import inference_pb2
from shared.errors import InvalidInput, PayloadTooLarge
from shared.tensor_codec import (
    MAX_RANK,
    NUMERIC_DATATYPES,
    array_from_bytes,
    array_from_json,
    bytes_tensor,
    datatype_of,
    element_count,
    from_proto,
    numpy_dtype,
    to_proto,
)

ALL_DATATYPES = sorted(NUMERIC_DATATYPES)
BIG = 1 << 20


def _sample(datatype: str, shape: tuple[int, ...]) -> np.ndarray:
    dtype = numpy_dtype(datatype)
    rng = np.random.default_rng(0)
    if dtype.kind == "b":
        return rng.integers(0, 2, size=shape).astype(bool)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
    return rng.standard_normal(shape).astype(dtype)


def test_every_v2_numeric_datatype_is_known() -> None:
    assert set(ALL_DATATYPES) == {
        "BOOL", "UINT8", "UINT16", "UINT32", "UINT64",
        "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64",
    }  # fmt: skip


@pytest.mark.parametrize("datatype", ALL_DATATYPES)
@pytest.mark.parametrize("shape", [(), (0,), (5,), (2, 3, 4)])
def test_proto_round_trip(datatype: str, shape: tuple[int, ...]) -> None:
    array = _sample(datatype, shape)
    tensor = to_proto("t", array)
    assert tensor.name == "t"
    assert tensor.datatype == datatype
    assert list(tensor.shape) == list(shape)
    assert len(tensor.data) == element_count(shape) * numpy_dtype(datatype).itemsize
    back = from_proto(tensor)
    assert back.dtype == numpy_dtype(datatype)
    assert back.shape == shape
    np.testing.assert_array_equal(back, array)
    assert datatype_of(back.dtype) == datatype


def test_to_proto_is_little_endian_and_row_major() -> None:
    big_endian_transposed = np.arange(6, dtype=">i4").reshape(2, 3).T
    tensor = to_proto("x", big_endian_transposed)
    assert tensor.datatype == "INT32"
    assert tensor.data == np.array([0, 3, 1, 4, 2, 5], dtype="<i4").tobytes()
    np.testing.assert_array_equal(from_proto(tensor), big_endian_transposed)


def test_to_proto_refuses_a_dtype_with_no_v2_name() -> None:
    with pytest.raises(ValueError, match="no v2 datatype"):
        to_proto("c", np.zeros(2, dtype=np.complex64))


@pytest.mark.parametrize("delta", [-1, 1, -4])
def test_from_proto_refuses_wrong_byte_length(delta: int) -> None:
    tensor = to_proto("x", np.zeros((2, 3), dtype=np.float32))
    data = tensor.data[:delta] if delta < 0 else tensor.data + b"\0" * delta
    bad = inference_pb2.Tensor(name="x", datatype="FP32", shape=[2, 3], data=data)
    with pytest.raises(InvalidInput, match=r"'x'.*bytes.*needs 24"):
        from_proto(bad)


def test_from_proto_refuses_a_shape_that_does_not_match_the_datatype() -> None:
    data = np.zeros(6, dtype=np.float32).tobytes()  # 24 bytes: right for FP32, not for FP64
    with pytest.raises(InvalidInput, match="needs 48"):
        from_proto(inference_pb2.Tensor(name="x", datatype="FP64", shape=[2, 3], data=data))


@pytest.mark.parametrize("shape", [[-1, 3], [2, -3], [-2, -3]])
def test_from_proto_refuses_negative_dims(shape: list[int]) -> None:
    data = np.zeros(6, dtype=np.float32).tobytes()  # (-2) * (-3) would match the length
    with pytest.raises(InvalidInput, match="negative"):
        from_proto(inference_pb2.Tensor(name="x", datatype="FP32", shape=shape, data=data))


@pytest.mark.parametrize("datatype", ["FP8", "BYTES", "", "fp32"])
def test_unknown_datatypes_are_invalid_input(datatype: str) -> None:
    with pytest.raises(InvalidInput, match="unsupported datatype"):
        numpy_dtype(datatype)
    with pytest.raises(InvalidInput, match="unsupported datatype"):
        from_proto(inference_pb2.Tensor(name="x", datatype=datatype, shape=[1], data=b"\0" * 4))
    with pytest.raises(InvalidInput, match="unsupported datatype"):
        array_from_json([1.0], datatype, [1], max_elements=BIG)


# --- array_from_json ---------------------------------------------------------------------


def test_flat_data_is_reshaped_row_major() -> None:
    array = array_from_json([1, 2, 3, 4, 5, 6], "FP32", [2, 3], max_elements=BIG)
    assert array.dtype == np.float32
    np.testing.assert_array_equal(array, [[1, 2, 3], [4, 5, 6]])


def test_nested_data_is_accepted() -> None:
    array = array_from_json([[[1, 2]], [[3, 4]]], "INT64", [2, 1, 2], max_elements=BIG)
    assert array.dtype == np.int64
    np.testing.assert_array_equal(array.ravel(), [1, 2, 3, 4])
    assert array.shape == (2, 1, 2)


def test_ints_are_accepted_for_floats() -> None:
    array = array_from_json([1, 2], "FP64", [2], max_elements=BIG)
    assert array.dtype == np.float64
    np.testing.assert_array_equal(array, [1.0, 2.0])


@pytest.mark.parametrize(
    ("data", "shape"),
    [([1.0, 2.0, 3.0], [2, 2]), ([1.0] * 5, [2, 2]), ([], [1]), ([[1.0, 2.0]], [3])],
)
def test_element_count_mismatch(data: list[Any], shape: list[int]) -> None:
    with pytest.raises(InvalidInput, match="elements but shape"):
        array_from_json(data, "FP32", shape, max_elements=BIG)


@pytest.mark.parametrize(
    "data",
    [
        ["a", "b"],
        [1.0, "2"],
        [None, 1.0],
        [{"x": 1}, 2.0],
        [[1.0, 2.0], [3.0]],  # ragged
        [[1.0], 2.0],  # mixed depth
    ],
    ids=["strings", "numeric-string", "null", "object", "ragged", "mixed-depth"],
)
def test_non_numeric_or_ragged_data(data: list[Any]) -> None:
    with pytest.raises(InvalidInput, match="numbers"):
        array_from_json(data, "FP32", [2], max_elements=BIG)


@pytest.mark.parametrize("datatype", ["INT8", "INT32", "INT64", "UINT8", "UINT64"])
def test_floats_are_refused_for_integer_types(datatype: str) -> None:
    with pytest.raises(InvalidInput, match="integers"):
        array_from_json([1.5, 2.0], datatype, [2], max_elements=BIG)
    with pytest.raises(InvalidInput, match="integers"):
        array_from_json([1.0, 2.0], datatype, [2], max_elements=BIG)  # whole, but floats


@pytest.mark.parametrize(
    ("datatype", "low", "high"),
    [
        ("INT8", -128, 127),
        ("UINT8", 0, 255),
        ("INT16", -(2**15), 2**15 - 1),
        ("INT64", -(2**63), 2**63 - 1),
        ("UINT32", 0, 2**32 - 1),
    ],
)
def test_integer_range_limits(datatype: str, low: int, high: int) -> None:
    array = array_from_json([low, high], datatype, [2], max_elements=BIG)
    assert array.tolist() == [low, high]
    for outside in (low - 1, high + 1):
        with pytest.raises(InvalidInput):
            array_from_json([outside, 0], datatype, [2], max_elements=BIG)


def test_int8_overflow_never_wraps() -> None:
    with pytest.raises(InvalidInput, match="outside the range of INT8"):
        array_from_json([127, 128], "INT8", [2], max_elements=BIG)
    with pytest.raises(InvalidInput, match="outside the range of INT8"):
        array_from_json([-129], "INT8", [1], max_elements=BIG)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("datatype", ["FP16", "FP32", "FP64"])
def test_non_finite_floats_are_refused(value: float, datatype: str) -> None:
    with pytest.raises(InvalidInput, match="NaN or infinite"):
        array_from_json([0.0, value], datatype, [2], max_elements=BIG)


def test_float_overflowing_fp16_is_refused() -> None:
    with pytest.raises(InvalidInput, match="NaN or infinite"):
        array_from_json([70000.0], "FP16", [1], max_elements=BIG)


def test_max_elements_is_payload_too_large() -> None:
    array = array_from_json([0.0] * 12, "FP32", [3, 4], max_elements=12)
    assert array.shape == (3, 4)
    with pytest.raises(PayloadTooLarge, match="13 elements; limit 12"):
        array_from_json([0.0] * 13, "FP32", [13], max_elements=12)


def test_a_huge_declared_shape_is_refused_before_reading_data() -> None:
    with pytest.raises(PayloadTooLarge):
        array_from_json([], "FP32", [10**9, 10**9], max_elements=BIG)


def test_more_data_than_allowed_is_too_large_whatever_the_shape() -> None:
    with pytest.raises(PayloadTooLarge, match="13 values; limit 12"):
        array_from_json([0.0] * 13, "FP32", [2], max_elements=12)
    with pytest.raises(PayloadTooLarge, match="16 elements; limit 12"):
        array_from_json([[0.0] * 8, [0.0] * 8], "FP32", [2], max_elements=12)


@pytest.mark.parametrize("shape", [[1] * (MAX_RANK + 1), [0] * 70, [1] * 100])
def test_from_proto_refuses_more_dimensions_than_any_model_has(shape: list[int]) -> None:
    tensor = inference_pb2.Tensor(name="x", datatype="FP16", shape=shape, data=b"\0\0")
    with pytest.raises(InvalidInput, match=f"at most {MAX_RANK}"):
        from_proto(tensor)


def test_negative_dims_in_json_shape() -> None:
    with pytest.raises(InvalidInput, match="negative"):
        array_from_json([], "FP32", [-1, 0], max_elements=BIG)


def test_bool() -> None:
    array = array_from_json([True, False, True, True], "BOOL", [2, 2], max_elements=BIG)
    assert array.dtype == np.bool_
    assert array.tolist() == [[True, False], [True, True]]
    with pytest.raises(InvalidInput, match="numbers"):
        array_from_json(["true", "false"], "BOOL", [2], max_elements=BIG)
    round_tripped = from_proto(to_proto("b", array))
    np.testing.assert_array_equal(round_tripped, array)


def test_scalar_shape() -> None:
    array = array_from_json([3.5], "FP32", [], max_elements=BIG)
    assert array.shape == ()
    assert float(array) == 3.5


# --- raw tensors from clients (binary tensor data extension, v2 gRPC) --------------------


def test_array_from_bytes_reads_little_endian_row_major() -> None:
    data = np.arange(6, dtype="<f4").tobytes()
    array = array_from_bytes(data, "FP32", [2, 3], max_elements=100)
    np.testing.assert_array_equal(array, np.arange(6, dtype=np.float32).reshape(2, 3))


@pytest.mark.parametrize(
    ("data", "shape", "error", "says"),
    [
        (b"\0" * 8, [3], InvalidInput, "8 bytes"),
        (np.array([np.inf], "<f4").tobytes(), [1], InvalidInput, "NaN or infinite"),
        (b"", [-1], InvalidInput, "negative"),
        (b"\0" * 4 * 101, [101], PayloadTooLarge, "limit 100"),
        (b"", [1] * 33, InvalidInput, "dimensions"),
    ],
    ids=["size", "inf", "negative", "too-many", "rank"],
)
def test_array_from_bytes_refuses(
    data: bytes, shape: list[int], error: type[Exception], says: str
) -> None:
    with pytest.raises(error, match=says):
        array_from_bytes(data, "FP32", shape, max_elements=100)


def test_bytes_tensor_prefixes_each_element_with_its_length() -> None:
    assert bytes_tensor(["ab", b"c"]) == b"\x02\0\0\0ab\x01\0\0\0c"
