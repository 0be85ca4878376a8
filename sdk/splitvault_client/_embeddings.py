"""Text in: ``POST /v1/embeddings`` request building and response parsing, for both clients."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt

from ._exceptions import ProtocolError
from ._protocol import Call


@dataclass(frozen=True, eq=False)
class Embeddings:
    """The embeddings of some sentences: ``vectors`` is ``(sentences, dim)`` float32.

    ``prompt_tokens``: the tokens the server counted (after truncation); ``truncated``: the
    indices of the sentences cut to ``max_tokens_per_input`` tokens. ``raw``: the response JSON.
    """

    model: str
    vectors: npt.NDArray[np.float32]
    prompt_tokens: int
    truncated: tuple[int, ...]
    max_tokens_per_input: int
    raw: dict[str, Any] = field(repr=False)


def embeddings_call(model: str, sentences: str | Sequence[str]) -> Call:
    """``POST /v1/embeddings`` for one sentence or a list of them."""
    if not isinstance(model, str) or not model:
        raise ValueError("model must be a non-empty string")
    items = [sentences] if isinstance(sentences, str) else list(sentences)
    if not items or not all(isinstance(item, str) for item in items):
        raise TypeError("sentences must be a string or a non-empty list of strings")
    body = json.dumps({"model": model, "input": items}, ensure_ascii=False).encode()
    return Call("POST", "/v1/embeddings", body=body)


def parse_embeddings(response: httpx.Response) -> Embeddings:
    """``Embeddings`` from a ``/v1/embeddings`` answer (float encoding)."""
    try:
        doc = response.json()
        rows = sorted(doc["data"], key=lambda item: int(item["index"]))
        vectors = np.asarray([row["embedding"] for row in rows], dtype=np.float32)
        usage = doc["usage"]
        return Embeddings(
            model=str(doc["model"]),
            vectors=vectors.reshape(len(rows), -1),
            prompt_tokens=int(usage["prompt_tokens"]),
            truncated=tuple(int(i) for i in usage.get("truncated", [])),
            max_tokens_per_input=int(usage.get("max_tokens_per_input", 0)),
            raw=doc,
        )
    except (ValueError, KeyError, TypeError) as error:
        raise ProtocolError(f"not an embeddings answer: {error}") from None
