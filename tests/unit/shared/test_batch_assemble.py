"""``assemble``: every request's rows in one buffer of the stage's dtype, in request order."""

from __future__ import annotations

import numpy as np
import torch

from shared.batch_plan import assemble
from shared.manifest import BATCH_DIM, DimSpec, StageManifest, TensorSpec


def _manifest(datatype: str, *tail: int | DimSpec) -> StageManifest:
    spec = TensorSpec(
        name="x", datatype=datatype, shape=[DimSpec(name=BATCH_DIM, min=1, max=64), *tail]
    )
    return StageManifest.model_construct(inputs=[spec])


def test_same_shaped_requests_are_cast_and_stacked_in_order() -> None:
    rng = np.random.default_rng(0)
    parts = [{"x": rng.standard_normal((rows, 4, 2)).astype(np.float16)} for rows in (1, 3, 2)]
    (stacked,) = assemble(_manifest("FP32", 4, 2), parts)
    assert stacked.dtype == torch.float32 and stacked.shape == (6, 4, 2)
    expected = np.concatenate([part["x"].astype(np.float32) for part in parts])
    assert np.array_equal(stacked.numpy(), expected)
    assert stacked.numpy().flags.writeable  # torch may write into it


def test_token_ids_are_cast_to_the_stage_integer_type() -> None:
    parts = [{"x": np.array([[1, 2, 3]], np.int64)}, {"x": np.array([[4, 5, 6]], np.int64)}]
    (stacked,) = assemble(_manifest("INT32", 3), parts)
    assert stacked.dtype == torch.int32
    assert stacked.tolist() == [[1, 2, 3], [4, 5, 6]]


def test_shorter_requests_are_zero_filled_along_padded_dims() -> None:
    length = DimSpec(name="seq", min=1, max=8)
    parts = [{"x": np.ones((1, 2), np.int64)}, {"x": np.full((2, 3), 7, np.int64)}]
    (stacked,) = assemble(_manifest("INT64", length), parts)
    assert stacked.tolist() == [[1, 1, 0], [7, 7, 7], [7, 7, 7]]
