"""Inputs made to fit a model's declared inputs before anything is sent.

NumPy and scikit-learn make float64 by default; a model declares FP32. An input whose dtype
differs from the declared datatype is converted when nothing that matters is lost (float64 ->
float32 as long as the values stay finite; integers that fit; whole numbers held as floats) and
refused here, with the conversion to write, when something would be (fractions to an integer
input, values out of range, anything to BOOL).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from ._protocol import Inputs, numpy_dtype, single_input_name
from ._types import ModelMetadata

Array = npt.NDArray[Any]
TEXT_INPUT = "text"  # the public tier's v2 BYTES input of a text model (UTF-8 sentences)


def conform(metadata: ModelMetadata, inputs: Inputs) -> dict[str, Array]:
    """``inputs`` as the model declares them: named (a bare array for a single-input model) and
    in each input's datatype; ``ValueError`` with the fix when they cannot be."""
    if isinstance(inputs, np.ndarray):
        inputs = {single_input_name(metadata): inputs}
    if not isinstance(inputs, Mapping) or not inputs:
        raise TypeError("inputs must be a NumPy array or a non-empty dict of name -> array")
    declared = {spec.name: spec.datatype for spec in metadata.inputs}
    if declared.get(TEXT_INPUT) == "BYTES" and len(declared) > 1:
        # A text model takes either its token arrays or one BYTES input of sentences (``embed``).
        text_only = sorted(inputs) == [TEXT_INPUT]
        declared = {n: d for n, d in declared.items() if (n == TEXT_INPUT) == text_only}
    if declared and sorted(inputs) != sorted(declared):
        raise ValueError(
            f"model {metadata.name!r} takes inputs {sorted(declared)}; got {sorted(inputs)}"
        )
    arrays = {}
    for name, array in inputs.items():
        if not isinstance(array, np.ndarray):
            raise TypeError(f"input {name!r} must be a NumPy array, got {type(array).__name__}")
        arrays[name] = cast(metadata.name, name, array, declared.get(name))
    return arrays


def cast(model: str, name: str, array: Array, datatype: str | None) -> Array:
    """``array`` in ``datatype``'s dtype, or ``ValueError`` saying why not and what to write."""
    target = None if datatype is None else numpy_dtype(datatype)
    if target is None or array.dtype == target:
        return array
    if np.can_cast(array.dtype, target, casting="safe"):
        return array.astype(target)
    problem = _loss(array, target)
    if problem is not None:
        spelled = "bool_" if target.kind == "b" else target.name
        raise ValueError(
            f"input {name!r} of model {model!r} is {array.dtype} but the model takes "
            f"{datatype}, and {problem}; convert it yourself, for instance "
            f"x.astype(np.{spelled}), after checking that this is what you mean"
        )
    with np.errstate(over="ignore", invalid="ignore"):
        return array.astype(target)


def _loss(array: Array, target: np.dtype[Any]) -> str | None:
    """What converting ``array`` to ``target`` would lose, or ``None`` if nothing that matters."""
    kind = array.dtype.kind
    if target.kind == "b":
        return "only booleans are taken as booleans"
    if kind not in "biuf":
        return f"{array.dtype} has no lossless conversion"
    if array.size == 0:
        return None
    if target.kind == "f":
        return _float_loss(array, target)
    if kind == "f" and not (np.isfinite(array).all() and (array == np.trunc(array)).all()):
        return "its values are not all whole numbers"
    info = np.iinfo(target)
    if array.min() < info.min or array.max() > info.max:
        return f"its values do not all fit in [{info.min}, {info.max}]"
    return None


def _float_loss(array: Array, target: np.dtype[Any]) -> str | None:
    if array.dtype.kind == "f":
        with np.errstate(over="ignore", invalid="ignore"):
            converted = array.astype(target)
        overflow = np.isfinite(array) & ~np.isfinite(converted)
        return f"some values exceed {target.name}'s range" if overflow.any() else None
    exact = 2 ** (np.finfo(target).nmant + 1)  # integers up to this are exact in ``target``
    if np.abs(array.astype(np.float64)).max() > exact:
        return f"integers beyond {exact} are not exact in {target.name}"
    return None
