"""OpenAI-compatible ``POST /v1/embeddings`` messages, and their mapping to and from v2.

An embeddings request is a v2 request with one ``BYTES`` input, ``text``; the answer is the
model's (rounded) embeddings, as floats or as base64 of little-endian float32 (what the OpenAI
client asks for by default), with ``usage``: the tokens of the request after truncation, and
which inputs were truncated.
"""

from __future__ import annotations

import base64
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from public_api.service import InferenceOutcome
from public_api.text import TEXT_INPUT, TextUsage
from public_api.v2 import InferenceRequest, RequestInput
from shared.manifest import MODEL_NAME_PATTERN

MAX_INPUTS = 4096  # the schema's bound; each model's own max_batch_size is checked after


class OpenAIError(BaseModel):
    """OpenAI's error object (``public_api.errors.error_body``)."""

    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIErrorBody(BaseModel):
    """Every error of ``/v1/embeddings``: ``{"error": {"message", "type", "param", "code"}}``."""

    error: OpenAIError


class EmbeddingsRequest(BaseModel):
    """``POST /v1/embeddings`` body; ``user`` is ignored, an unknown field is a 400 (a typo
    answered as if it were not there would mislead)."""

    model_config = ConfigDict(extra="forbid")

    input: str | Annotated[list[str], Field(max_length=MAX_INPUTS)] = Field(
        description="a sentence, or a list of sentences"
    )
    model: str = Field(pattern=MODEL_NAME_PATTERN)
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, description="not supported: leave it out")
    user: str | None = Field(default=None, max_length=256)

    def sentences(self) -> list[str]:
        """The sentences, in order."""
        return [self.input] if isinstance(self.input, str) else self.input


class Embedding(BaseModel):
    """One input's embedding."""

    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # base64 of float32 little-endian when asked


class EmbeddingsUsage(BaseModel):
    """Tokens counted after truncation (special tokens included); ``truncated``: the indices of
    the inputs cut to ``max_tokens_per_input`` tokens."""

    prompt_tokens: int
    total_tokens: int
    truncated: list[int]
    max_tokens_per_input: int


class EmbeddingsResponse(BaseModel):
    """The answer, as OpenAI's embeddings API shapes it."""

    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingsUsage


def v2_request(body: EmbeddingsRequest) -> InferenceRequest:
    """The v2 request an embeddings request stands for: one ``text`` input."""
    sentences = body.sentences()
    item = RequestInput(name=TEXT_INPUT, shape=[len(sentences)], datatype="BYTES", data=sentences)
    return InferenceRequest(inputs=[item])


def embeddings_response(
    body: EmbeddingsRequest, outcome: InferenceOutcome, usage: TextUsage
) -> EmbeddingsResponse:
    """The OpenAI-shaped answer of ``outcome``."""
    (output,) = outcome.response.outputs
    rows = np.asarray(output.data, dtype="<f4").reshape(output.shape)
    data = [
        Embedding(index=i, embedding=_encode(row, body.encoding_format))
        for i, row in enumerate(rows)
    ]
    return EmbeddingsResponse(
        data=data,
        model=body.model,
        usage=EmbeddingsUsage(
            prompt_tokens=usage.total,
            total_tokens=usage.total,
            truncated=usage.truncated,
            max_tokens_per_input=usage.max_length,
        ),
    )


def _encode(row: np.ndarray, encoding: str) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(row.astype("<f4").tobytes()).decode("ascii")
    return [float(value) for value in row]
