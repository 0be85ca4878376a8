"""Open Inference Protocol v2 (KServe / Triton) REST messages, as pydantic models."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

_NAME = Field(min_length=1, max_length=256)


class RequestInput(BaseModel):
    """One input tensor; ``data`` is row-major, flat or nested. Without ``data``, the tensor's
    bytes follow the JSON (binary tensor data extension: ``parameters.binary_data_size``)."""

    name: str = _NAME
    shape: list[int] = Field(max_length=16)
    datatype: str = Field(max_length=16)
    data: list[Any] | None = None
    parameters: dict[str, Any] | None = None


class RequestOutput(BaseModel):
    """An output the client asks for; ``parameters.classification`` asks for top-k."""

    name: str = _NAME
    parameters: dict[str, Any] | None = None


class InferenceRequest(BaseModel):
    """``POST /v2/models/{name}/infer`` body."""

    model_config = ConfigDict(extra="ignore")

    id: str | None = Field(default=None, max_length=256)
    parameters: dict[str, Any] | None = None
    inputs: list[RequestInput] = Field(min_length=1, max_length=64)
    outputs: list[RequestOutput] | None = Field(default=None, max_length=16)


class ResponseOutput(BaseModel):
    """One output tensor of an answer."""

    name: str
    shape: list[int]
    datatype: str
    data: list[Any]
    parameters: dict[str, Any] | None = None


class InferenceResponse(BaseModel):
    """The answer to an inference request."""

    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: dict[str, Any] | None = None
    outputs: list[ResponseOutput]


class MetadataTensor(BaseModel):
    """Name, datatype and shape of a tensor; -1 marks a dynamic dimension."""

    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    """``GET /v2/models/{name}``."""

    name: str
    versions: list[str]
    platform: str
    inputs: list[MetadataTensor]
    outputs: list[MetadataTensor]
    parameters: dict[str, Any]


class ModelEntry(BaseModel):
    """One model of ``GET /v2/models``: ready in both tiers, or why not."""

    name: str
    versions: list[str]
    platform: str
    ready: bool
    reason: str | None = None


class ModelList(BaseModel):
    """``GET /v2/models``: every model this endpoint serves."""

    models: list[ModelEntry]


class RepositoryIndexRequest(BaseModel):
    """``POST /v2/repository/index`` body (Triton's model repository extension)."""

    ready: bool = False  # only the models ready for inference


class RepositoryIndexEntry(BaseModel):
    """One model of Triton's repository index."""

    name: str
    version: str
    state: str  # READY or UNAVAILABLE
    reason: str


class ServerMetadata(BaseModel):
    """``GET /v2``."""

    name: str
    version: str
    extensions: list[str]


class ErrorBody(BaseModel):
    """Every error: ``{"error": "..."}``."""

    error: str


class TermsBody(BaseModel):
    """``GET /v1/terms``."""

    version: str
    text: str
    sha256: str


class AcceptTerms(BaseModel):
    """``POST /v1/terms/accept`` body: the version the client read."""

    version: str = Field(min_length=1, max_length=64)


class AcceptTermsResponse(BaseModel):
    """Acceptance recorded."""

    accepted: bool
    version: str
