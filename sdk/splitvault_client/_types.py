"""Results the clients return: model metadata, predictions and terms of use."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

Task = Literal["classification", "embedding"]


@dataclass(frozen=True)
class TensorSpec:
    """One declared input or output; ``-1`` in ``shape`` marks a dynamic dimension."""

    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ModelMetadata:
    """What ``GET /v2/models/{name}`` says about a model; ``max_batch_size`` is the most rows
    one request may carry (``None`` when the server does not say)."""

    name: str
    versions: tuple[str, ...]
    platform: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    task: Task
    policy: dict[str, Any]
    labels: tuple[str, ...] | None
    raw: dict[str, Any] = field(repr=False, compare=False)
    max_batch_size: int | None = None


@dataclass(frozen=True, eq=False)
class Prediction:
    """The answer to one inference request.

    Classifiers fill ``labels`` (``None`` where the server sent no label), ``indices``
    (``(batch, k)`` int64) and ``scores`` (``(batch, k)`` float32, NaN where the server sent no
    score). Embedding models fill ``embeddings`` (``(batch, dim)`` float32). ``raw`` is the
    response JSON.
    """

    model_name: str
    id: str | None
    task: Task
    raw: dict[str, Any] = field(repr=False)
    labels: list[list[str | None]] | None = None
    indices: npt.NDArray[np.int64] | None = None
    scores: npt.NDArray[np.float32] | None = None
    embeddings: npt.NDArray[np.float32] | None = None


@dataclass(frozen=True)
class Terms:
    """The server's terms of use; accept them by ``version``."""

    version: str
    text: str
    sha256: str


@dataclass(frozen=True)
class TermsAcceptance:
    """The server's record that the caller accepted one version of the terms."""

    accepted: bool
    version: str
