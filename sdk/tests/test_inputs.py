"""Inputs converted to a model's declared datatypes, or refused with the fix, before sending."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from splitvault_client import ModelMetadata, TensorSpec
from splitvault_client._inputs import cast, conform


def model(*inputs: tuple[str, str]) -> ModelMetadata:
    specs = tuple(TensorSpec(name, datatype, (-1, 4)) for name, datatype in inputs)
    return ModelMetadata("m", ("1",), "splitvault", specs, (), "classification", {}, None, {})


def test_float64_from_numpy_defaults_becomes_the_declared_fp32() -> None:
    images = np.random.default_rng(0).random((3, 4))  # float64, as NumPy and sklearn make it
    ((name, sent),) = conform(model(("image", "FP32")), images).items()
    assert name == "image" and sent.dtype == np.float32
    np.testing.assert_array_equal(sent, images.astype(np.float32))


@pytest.mark.parametrize(
    ("values", "datatype", "dtype"),
    [
        (np.arange(4, dtype=np.uint8), "FP32", np.float32),  # image bytes
        (np.arange(4, dtype=np.int32), "INT64", np.int64),  # widening
        (np.array([True, False]), "FP32", np.float32),
        (np.array([1.0, 7.0, -2.0]), "INT64", np.int64),  # whole numbers held as floats
        (np.array([3, 2**24], dtype=np.int64), "FP32", np.float32),  # exact in float32
        (np.array([5, 70000], dtype=np.int64), "INT32", np.int32),  # fits
        (np.array([0.5, 1e4], dtype=np.float32), "FP16", np.float16),
        (np.zeros((0, 4)), "INT8", np.int8),  # empty
    ],
)
def test_conversions_that_lose_nothing_that_matters_are_made(
    values: Any, datatype: str, dtype: Any
) -> None:
    sent = cast("m", "x", values, datatype)
    assert sent.dtype == dtype
    np.testing.assert_array_equal(sent.astype(values.dtype), values)


def test_arrays_already_in_the_declared_datatype_are_sent_as_they_are() -> None:
    ids = np.array([[1, 2]], dtype=np.int64)
    assert cast("m", "ids", ids, "INT64") is ids
    assert cast("m", "text", ids, "BYTES") is ids  # a datatype NumPy has no dtype for


@pytest.mark.parametrize(
    ("values", "datatype", "why", "fix"),
    [
        (np.array([1e39]), "FP32", "some values exceed float32's range", "np.float32"),
        (np.array([1.5, 2.0]), "INT64", "not all whole numbers", "np.int64"),
        (np.array([np.nan]), "INT32", "not all whole numbers", "np.int32"),
        (np.array([2**31], dtype=np.int64), "INT32", "do not all fit", "np.int32"),
        (np.array([-1], dtype=np.int64), "UINT8", "do not all fit in [0, 255]", "np.uint8"),
        (np.array([2**24 + 1], dtype=np.int64), "FP32", "beyond 16777216", "np.float32"),
        (np.array([0, 1]), "BOOL", "only booleans", "np.bool_"),
        (np.array(["1.0"]), "FP32", "no lossless conversion", "np.float32"),
    ],
)
def test_conversions_that_would_lose_something_are_refused_with_the_fix(
    values: Any, datatype: str, why: str, fix: str
) -> None:
    with pytest.raises(ValueError) as caught:
        cast("digits", "image", values, datatype)
    message = str(caught.value)
    assert message.startswith(f"input 'image' of model 'digits' is {values.dtype} but the model")
    assert why in message and f"x.astype({fix})" in message


def test_inputs_are_named_as_the_model_declares_them() -> None:
    two = model(("ids", "INT64"), ("mask", "INT64"))
    ids = np.ones((1, 4), np.int64)
    with pytest.raises(ValueError, match=r"takes inputs \['ids', 'mask'\]; got \['ids'\]"):
        conform(two, {"ids": ids})
    with pytest.raises(ValueError, match="pass a dict of name -> array"):
        conform(two, ids)
    with pytest.raises(TypeError, match="must be a NumPy array"):
        conform(two, {"ids": [[1, 2, 3, 4]], "mask": ids})  # type: ignore[dict-item]
    with pytest.raises(TypeError):
        conform(two, {})
    sent = conform(two, {"mask": ids.astype(np.int32), "ids": ids})
    assert {name: array.dtype for name, array in sent.items()} == {
        "mask": np.int64,
        "ids": np.int64,
    }


def test_a_text_model_takes_its_token_arrays_without_the_text_input() -> None:
    specs = (
        TensorSpec("input_ids", "INT64", (-1, -1)),
        TensorSpec("attention_mask", "INT64", (-1, -1)),
        TensorSpec("text", "BYTES", (-1,)),
    )
    metadata = ModelMetadata("minilm", ("1",), "splitvault", specs, (), "embedding", {}, None, {})
    ids = np.ones((1, 4), dtype=np.int32)
    arrays = conform(metadata, {"input_ids": ids, "attention_mask": ids})
    assert sorted(arrays) == ["attention_mask", "input_ids"]
    assert arrays["input_ids"].dtype == np.int64
    with pytest.raises(ValueError, match="takes inputs"):
        conform(metadata, {"input_ids": ids})
