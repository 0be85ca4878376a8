"""One ``predict`` over more rows than a request may carry, sent as a series of requests.

Each chunk is a request of its own (signed on its own when the client signs) and counts
against the key's limits like any other. Chunks go one after another, never in parallel. The
server says how far it will go: a chunk larger than the key's burst (``RateLimit-Policy``) is
refused before anything runs, so later chunks shrink to the burst; a chunk refused by the rate
limiter is sent again after its ``Retry-After`` when that is no longer than ``max_wait``.
No I/O here: the clients send ``pending()`` and report back with ``answered`` or ``refused``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import httpx

from ._exceptions import ProtocolError, RateLimited
from ._inputs import Array
from ._protocol import json_object
from ._types import ModelMetadata

_BURST = re.compile(r'"burst"\s*;\s*q\s*=\s*(\d+)')
MAX_WAITS = 8  # rate-limit waits for one chunk before its refusal is raised


def chunk_size(
    metadata: ModelMetadata, arrays: Mapping[str, Array], chunk: bool | int
) -> int | None:
    """Rows per request, or ``None`` for one request. ``chunk``: ``False`` (one request, refused
    here when the model's ``max_batch_size`` is exceeded), ``True`` (that size) or a row count."""
    if isinstance(chunk, bool):
        size = metadata.max_batch_size
    elif isinstance(chunk, int) and chunk >= 1:
        size = chunk if metadata.max_batch_size is None else min(chunk, metadata.max_batch_size)
    else:
        raise ValueError(f"chunk must be True, False or a positive row count, got {chunk!r}")
    rows = max((array.shape[0] for array in arrays.values() if array.ndim), default=0)
    if size is None:
        if chunk is True:
            raise ValueError(
                f"the server does not say how many rows model {metadata.name!r} takes at once; "
                "pass chunk=N (rows per request)"
            )
        return None
    if rows <= size:
        return None
    if chunk is False:
        raise ValueError(
            f"{rows} rows are more than model {metadata.name!r} takes in one request ({size}); "
            f"pass chunk=True to send them as {math.ceil(rows / size)} requests"
        )
    return size


def policy_burst(headers: Mapping[str, str]) -> int | None:
    """The largest request, in samples, that the ``RateLimit-Policy`` header admits."""
    found = _BURST.search(headers.get("RateLimit-Policy", ""))
    return int(found.group(1)) if found and int(found.group(1)) >= 1 else None


class ChunkedPredict:
    """The state of one chunked predict: the rows answered so far and the next chunk."""

    def __init__(self, arrays: Mapping[str, Array], size: int, *, max_wait: float) -> None:
        leading = {array.shape[0] if array.ndim else None for array in arrays.values()}
        if len(leading) != 1 or None in leading:
            raise ValueError("inputs split into chunks must all have the same number of rows")
        self.arrays = dict(arrays)
        self.rows: int = leading.pop() or 0
        self.size = size
        self.max_wait = max_wait
        self.offset = 0
        self.sent = 0  # rows in the chunk last handed out
        self.waits = 0
        self.docs: list[dict[str, Any]] = []

    def pending(self) -> dict[str, Array] | None:
        """The next chunk's inputs, or ``None`` when every row has been answered."""
        if self.offset >= self.rows:
            return None
        end = min(self.offset + self.size, self.rows)
        self.sent = end - self.offset
        return {name: array[self.offset : end] for name, array in self.arrays.items()}

    def chunk_id(self, request_id: str | None) -> str | None:
        """The next chunk's request id: ``ID-N`` (N from 0), or none."""
        return None if request_id is None else f"{request_id}-{len(self.docs)}"

    def answered(self, response: httpx.Response) -> None:
        """Keep a chunk's answer; shrink later chunks to the key's burst if it is smaller."""
        self.docs.append(json_object(response))
        self.offset += self.sent
        self.waits = 0
        burst = policy_burst(response.headers)
        if burst is not None:
            self.size = min(self.size, burst)

    def refused(self, error: RateLimited) -> float:
        """Seconds to wait before sending the same rows again; re-raises ``error`` when waiting
        would not help (a daily quota, a long wait, too many waits)."""
        burst = policy_burst(error.headers)
        if burst is not None and burst < self.sent:
            self.size = burst  # never admissible as it was; nothing was counted
            return 0.0
        wait = error.retry_after
        if wait is not None and wait <= self.max_wait and self.waits < MAX_WAITS:
            self.waits += 1
            return wait
        error.add_note(f"{self.offset} of {self.rows} rows had been answered")
        raise error

    def merged(self, request_id: str | None) -> dict[str, Any]:
        """One v2 response for all the rows: each output's data joined in row order."""
        first = self.docs[0]
        outputs = []
        for index, output in enumerate(first.get("outputs", [])):
            parts = [_output(doc, index, output.get("name")) for doc in self.docs]
            shape = [sum(part["shape"][0] for part in parts), *output["shape"][1:]]
            data = [item for part in parts for item in part["data"]]
            outputs.append({**output, "shape": shape, "data": data})
        return {**first, "id": request_id, "outputs": outputs}


def _output(doc: dict[str, Any], index: int, name: Any) -> dict[str, Any]:
    outputs = doc.get("outputs")
    part = outputs[index] if isinstance(outputs, list) and index < len(outputs) else None
    if (
        not isinstance(part, dict)
        or part.get("name") != name
        or not isinstance(part.get("shape"), list)
        or not part["shape"]
        or not isinstance(part["shape"][0], int)
        or not isinstance(part.get("data"), list)
    ):
        raise ProtocolError(f"the chunks' answers disagree on output {name!r}")
    return part
