"""check_tensors: the one place both tiers refuse tensors that do not fit a manifest."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from shared.errors import InvalidInput
from shared.manifest import DimSpec, TensorSpec
from shared.validation import check_tensors

BATCH = DimSpec(name="batch", min=1, max=8)
SEQ = DimSpec(name="seq", min=2, max=16)
IMAGE = TensorSpec(name="image", datatype="FP32", shape=[BATCH, 1, 8, 8])
IDS = TensorSpec(name="input_ids", datatype="INT64", shape=[BATCH, SEQ], value_range=(0, 99))
MASK = TensorSpec(name="attention_mask", datatype="INT64", shape=[BATCH, SEQ], value_range=(0, 1))


def _image(batch: int = 2, dtype: Any = np.float32) -> np.ndarray:
    return np.zeros((batch, 1, 8, 8), dtype=dtype)


def _text(batch: int = 2, seq: int = 5, mask_seq: int | None = None) -> dict[str, np.ndarray]:
    return {
        "input_ids": np.full((batch, seq), 7, dtype=np.int64),
        "attention_mask": np.ones((batch, mask_seq or seq), dtype=np.int64),
    }


def test_good_tensors_return_named_dim_sizes() -> None:
    assert check_tensors([IMAGE], {"image": _image(3)}) == {"batch": 3}
    assert check_tensors([IDS, MASK], _text(4, 9)) == {"batch": 4, "seq": 9}


def test_input_order_does_not_matter() -> None:
    text = _text()
    reordered = {"attention_mask": text["attention_mask"], "input_ids": text["input_ids"]}
    assert check_tensors([IDS, MASK], reordered) == {"batch": 2, "seq": 5}


@pytest.mark.parametrize(
    "names",
    [["img"], ["image", "extra"], [], ["input_ids"]],
    ids=["wrong", "extra", "none", "other-model"],
)
def test_names_must_match_exactly(names: list[str]) -> None:
    tensors = {name: _image() for name in names}
    with pytest.raises(InvalidInput, match=r"inputs must be exactly \['image'\]"):
        check_tensors([IMAGE], tensors)


def test_missing_second_input_is_named() -> None:
    with pytest.raises(InvalidInput, match="attention_mask"):
        check_tensors([IDS, MASK], {"input_ids": _text()["input_ids"]})


@pytest.mark.parametrize("dtype", [np.float16, np.float64, np.int64, np.int32, np.bool_])
def test_datatype_must_match_without_transport(dtype: Any) -> None:
    with pytest.raises(InvalidInput, match="'image' must have datatype FP32"):
        check_tensors([IMAGE], {"image": _image(dtype=dtype)})


ACTIVATION = TensorSpec(name="hidden", datatype="FP32", shape=[BATCH, 4], source="front:x")
RAW_FLOAT = TensorSpec(name="scale", datatype="FP32", shape=[BATCH, 1], source="request:scale")


def _wire(dtype: Any = np.float16, raw: Any = np.float32) -> dict[str, np.ndarray]:
    return {"hidden": np.zeros((2, 4), dtype=dtype), "scale": np.ones((2, 1), dtype=raw)}


def test_transport_accepts_activations_in_exactly_the_transport_datatype() -> None:
    assert check_tensors([ACTIVATION, RAW_FLOAT], _wire(), transport="FP16") == {"batch": 2}
    assert check_tensors([ACTIVATION], {"hidden": _wire(np.float32)["hidden"]}, transport="FP32")


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64, np.bool_])
def test_transport_refuses_any_other_activation_datatype(dtype: Any) -> None:
    with pytest.raises(InvalidInput, match="'hidden' must have datatype FP16"):
        check_tensors([ACTIVATION, RAW_FLOAT], _wire(dtype), transport="FP16")


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_transport_keeps_request_inputs_in_their_own_datatype(dtype: Any) -> None:
    with pytest.raises(InvalidInput, match="'scale' must have datatype FP32"):
        check_tensors([ACTIVATION, RAW_FLOAT], _wire(raw=dtype), transport="FP16")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("name", ["hidden", "scale"])
def test_transport_refuses_non_finite_values_naming_the_input(bad: float, name: str) -> None:
    tensors = _wire()
    tensors[name] = tensors[name].copy()
    tensors[name][1, 0] = bad
    with pytest.raises(InvalidInput, match=f"'{name}' holds NaN or infinite values"):
        check_tensors([ACTIVATION, RAW_FLOAT], tensors, transport="FP16")


def test_transport_does_not_loosen_integer_inputs() -> None:
    text = _text()
    text["input_ids"] = text["input_ids"].astype(np.int32)
    with pytest.raises(InvalidInput, match="'input_ids' must have datatype INT64"):
        check_tensors([IDS, MASK], text, transport="FP16")
    text["input_ids"] = text["input_ids"].astype(np.float16)
    with pytest.raises(InvalidInput, match="'input_ids' must have datatype INT64"):
        check_tensors([IDS, MASK], text, transport="FP16")


@pytest.mark.parametrize("shape", [(2, 64), (2, 1, 8, 8, 1), (2,), ()])
def test_rank_must_match(shape: tuple[int, ...]) -> None:
    with pytest.raises(InvalidInput, match="'image' must have 4 dimensions"):
        check_tensors([IMAGE], {"image": np.zeros(shape, dtype=np.float32)})


@pytest.mark.parametrize(
    ("shape", "index"), [((2, 3, 8, 8), 1), ((2, 1, 4, 16), 2), ((2, 1, 8, 9), 3)]
)
def test_fixed_dims_must_match(shape: tuple[int, ...], index: int) -> None:
    with pytest.raises(InvalidInput, match=f"'image' dimension {index} must be"):
        check_tensors([IMAGE], {"image": np.zeros(shape, dtype=np.float32)})


@pytest.mark.parametrize("batch", [1, 8])
def test_dynamic_dim_bounds_are_inclusive(batch: int) -> None:
    assert check_tensors([IMAGE], {"image": _image(batch)}) == {"batch": batch}


@pytest.mark.parametrize("batch", [0, 9, 1000])
def test_dynamic_dim_outside_its_range(batch: int) -> None:
    with pytest.raises(InvalidInput, match=rf"batch must be in \[1, 8\]; got {batch}"):
        check_tensors([IMAGE], {"image": _image(batch)})


@pytest.mark.parametrize("seq", [1, 17])
def test_sequence_outside_its_range(seq: int) -> None:
    with pytest.raises(InvalidInput, match=rf"seq must be in \[2, 16\]; got {seq}"):
        check_tensors([IDS, MASK], _text(seq=seq))


def test_named_dims_must_agree_across_inputs() -> None:
    with pytest.raises(InvalidInput, match="seq is 6 but another input has 5"):
        check_tensors([IDS, MASK], _text(seq=5, mask_seq=6))
    text = _text(batch=2)
    text["attention_mask"] = np.ones((3, 5), dtype=np.int64)
    with pytest.raises(InvalidInput, match="batch is 3 but another input has 2"):
        check_tensors([IDS, MASK], text)


def test_value_range_is_inclusive() -> None:
    text = _text()
    text["input_ids"][0, 0], text["input_ids"][1, 4] = 0, 99
    assert check_tensors([IDS, MASK], text) == {"batch": 2, "seq": 5}


@pytest.mark.parametrize(
    ("name", "value"), [("input_ids", 100), ("input_ids", -1), ("attention_mask", 2)]
)
def test_values_outside_the_range(name: str, value: int) -> None:
    text = _text()
    text[name][1, 3] = value
    with pytest.raises(InvalidInput, match=rf"'{name}' values must be in"):
        check_tensors([IDS, MASK], text)


def test_value_range_of_empty_tensor_is_not_checked() -> None:
    spec = TensorSpec(
        name="ids", datatype="INT64", shape=[DimSpec(name="n", min=0, max=4)], value_range=(1, 2)
    )
    assert check_tensors([spec], {"ids": np.zeros((0,), dtype=np.int64)}) == {"n": 0}
