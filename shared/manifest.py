"""The schema of a packed model: its config (split point, output policy, transport) and the
manifest of each stage. Written by ``splitvault pack``, read by both tiers."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from shared.tensor_codec import numpy_dtype

MODEL_NAME_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,63}$"
CONFIG_FILE = "config.json"
MANIFEST_FILE = "manifest.json"
BATCH_DIM = "batch"  # the dynamic dimension that counts the samples of a request
MAX_TOP_K = 100  # the largest k a top-k policy may allow (and a request may ask for)
MESSAGE_OVERHEAD_BYTES = 64 * 1024  # names, shapes and framing around the tensor bytes


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DimSpec(_Strict):
    """A dynamic dimension with its allowed range, shared by every tensor that has it."""

    name: str
    min: int = Field(ge=0)
    max: int = Field(ge=1)


class TensorSpec(_Strict):
    """Name, v2 datatype and shape (ints are fixed, ``DimSpec`` are dynamic) of one tensor."""

    name: str
    datatype: str
    shape: list[int | DimSpec]
    # Back-stage inputs only: "front:<output name>" or "request:<input name>".
    source: str | None = None
    # Integer inputs only: the inclusive range of valid values (an embedding's vocabulary).
    value_range: tuple[int, int] | None = None


class TopKPolicy(_Strict):
    """Classifier answers: the k best classes with probabilities rounded to ``decimals``."""

    kind: Literal["topk"] = "topk"
    k: int = Field(default=3, ge=1, le=MAX_TOP_K)
    decimals: int = Field(default=4, ge=0, le=8)


class LabelPolicy(_Strict):
    """Classifier answers: the best class only, no score."""

    kind: Literal["label"] = "label"


class RoundingPolicy(_Strict):
    """Embedding answers: every value rounded to ``decimals``."""

    kind: Literal["rounding"] = "rounding"
    decimals: int = Field(default=3, ge=0, le=8)


OutputPolicy = Annotated[TopKPolicy | LabelPolicy | RoundingPolicy, Field(discriminator="kind")]


class WatermarkConfig(_Strict):
    """Ownership watermark of a classifier's answers, applied in the private tier (on by default).

    ``label`` with ``marks = "region"`` (the default): in a keyed share ``region_fraction`` of
    the regions of a keyed partition of the back-stage input space (``region_dims`` keyed
    projections in cells of ``region_cell``, with the model's top two classes), queries whose
    top-1 probability leads the runner-up by less than ``max_margin`` are answered with the
    runner-up (``private_core.watermark.regions``). ``marks = "query"``: per-query (DAWN-style)
    marks, a keyed share ``fraction`` of the queries whose top-1 probability is below
    ``max_confidence`` answered with a keyed other class (``max_confidence = 1``: plain DAWN).
    ``signal``: every answer moves ``amplitude`` of probability (capped) from its top-1 class to a
    keyed other class, never changing the top-1 class (top-k policy only). ``auto`` picks
    ``label``. Marked answers are kept encrypted in the private tier, at most
    ``trigger_max_records`` / ``trigger_max_bytes`` per API key (its oldest dropped).
    """

    enabled: bool = True
    scheme: Literal["label", "signal", "auto"] = "auto"
    fraction: float = Field(default=0.05, gt=0.0, le=0.5)
    max_confidence: float = Field(default=0.9, gt=0.0, le=1.0)
    amplitude: float = Field(default=0.1, gt=0.0, le=0.5)
    trigger_max_records: int = Field(default=100_000, ge=1)  # per API key
    trigger_max_bytes: int = Field(default=128 << 20, ge=4096)  # per API key
    # Region marks (issue 14): the defaults were measured in bench/watermark_benchmark.py.
    marks: Literal["region", "query"] = "region"
    region_fraction: float = Field(default=0.3, gt=0.0, le=0.5)
    region_dims: int = Field(default=4, ge=1, le=16)
    region_cell: float = Field(default=0.5, gt=0.0)
    max_margin: float = Field(default=0.5, gt=0.0, le=1.0)


class ModelConfig(_Strict):
    """Per-model settings chosen at pack time; the private tier's copy is authoritative."""

    name: str = Field(pattern=MODEL_NAME_PATTERN)
    split: str
    task: Literal["classification", "embedding"]
    policy: OutputPolicy
    transport_datatype: Literal["FP16", "FP32"] = "FP16"
    labels: list[str] | None = None
    max_batch_size: int = Field(default=64, ge=1, le=4096)
    # Private tier's copy only: the public tier's config never says how answers are marked.
    watermark: WatermarkConfig | None = None

    @model_validator(mode="after")
    def _policy_fits_task(self) -> ModelConfig:
        allowed = {"classification": {"topk", "label"}, "embedding": {"rounding"}}[self.task]
        if self.policy.kind not in allowed:
            raise ValueError(f"policy {self.policy.kind!r} does not fit task {self.task!r}")
        return self

    @model_validator(mode="after")
    def _watermark_fits_policy(self) -> ModelConfig:
        mark = self.watermark
        if mark is None or not mark.enabled:
            return self
        if self.task != "classification":
            raise ValueError("a watermark needs a classifier (embeddings are not watermarked)")
        if mark.scheme == "signal" and self.policy.kind != "topk":
            raise ValueError("the signal watermark needs the topk policy (it marks scores)")
        return self


class TierCount(_Strict):
    """Parameters held by one tier."""

    parameters: int
    bytes: int


class TextInput(_Strict):
    """Front stage of a text model only: the tokenizer (``tokenizers`` JSON, public) that turns
    sentences into the request inputs, so clients may send text (issue 16)."""

    file: str = "tokenizer.json"
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    max_length: int = Field(ge=2)  # tokens per sentence; longer ones are truncated
    ids: str  # the input that takes the token ids
    mask: str | None = None  # the input that takes the attention mask, if any
    type_ids: str | None = None  # the input that takes the token type ids, if any


class StageManifest(_Strict):
    """What one stage file holds and how to check it."""

    model: str
    stage: Literal["front", "back"]
    file: str
    encrypted: bool
    sha256: str = Field(description="SHA-256 of the serialized program (before encryption)")
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    tiers: dict[Literal["public", "private"], TierCount]
    torch_version: str
    # Front stage only: request inputs the public tier passes to the back stage as they came.
    forward_inputs: list[str] = Field(default_factory=list)
    # The same in the front and back manifests of one `pack` (shared/pairing.py); a model whose
    # tiers hold different ids was re-packed and only one tier restarted. None: packed before
    # pairing ids existed (served, with a warning).
    pairing_id: str | None = Field(default=None, pattern=r"^[0-9a-f]{32}$")
    # Front stage of a text model: its tokenizer (None: clients send token ids).
    text: TextInput | None = None


def write_json(path: Path, model: BaseModel) -> None:
    """Write a pydantic model as indented JSON."""
    path.write_text(model.model_dump_json(indent=2) + "\n", encoding="utf-8")


def read_config(model_dir: Path) -> ModelConfig:
    """Read a model folder's ``config.json``."""
    return ModelConfig.model_validate(json.loads((model_dir / CONFIG_FILE).read_text("utf-8")))


def read_manifest(model_dir: Path) -> StageManifest:
    """Read a model folder's ``manifest.json``."""
    return StageManifest.model_validate(json.loads((model_dir / MANIFEST_FILE).read_text("utf-8")))


def max_message_bytes(specs: Sequence[TensorSpec], config: ModelConfig) -> int:
    """The largest gRPC message carrying ``specs`` for a model, in bytes.

    ``config.max_batch_size`` rows at the largest size of every dim, floats at their datatype
    or the transport datatype if wider, plus framing. Both tiers size their limits with it:
    the public tier for the activations it sends, the private tier for what it accepts.
    """
    transport = numpy_dtype(config.transport_datatype).itemsize
    per_row = 0
    for spec in specs:
        dtype = numpy_dtype(spec.datatype)
        size = max(dtype.itemsize, transport) if dtype.kind == "f" else dtype.itemsize
        for dim in spec.shape[1:]:
            size *= dim.max if isinstance(dim, DimSpec) else dim
        per_row += size
    return config.max_batch_size * per_row + MESSAGE_OVERHEAD_BYTES
