"""The ``InferBatch`` call between the tiers: its size limit and how one request's failure
travels inside it (the status an ``Infer`` call would have ended with, by the one error table).
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from protos import inference_pb2
from shared.errors import SplitVaultError, error_from_grpc, grpc_trailers, mapping_for

# Requests in one InferBatch call; the private tier refuses more (INVALID_ARGUMENT).
MAX_REQUESTS = 64
# The largest batch message (request or reply) either tier sends: the smallest message limit a
# tier may be configured with (``max_message_mb`` >= 4), so that a batch never fails whole on a
# limit each of its requests would have passed alone. A larger request or result goes alone.
MAX_BATCH_BYTES = 4 * 1024 * 1024
# What one request or result adds to a batch message beyond its own bytes (tag and length).
FRAMING_BYTES = 11
_CODES = {code.value[0]: code for code in grpc.StatusCode}


def failed(index: int, error: SplitVaultError) -> inference_pb2.InferResult:
    """The result of request ``index`` that ended with ``error``: its table code, message and
    trailers, as ``Infer`` would have aborted."""
    status = inference_pb2.InferStatus(
        code=mapping_for(error).grpc_code.value[0],
        message=error.message,
        trailers=dict(grpc_trailers(error)),
    )
    return inference_pb2.InferResult(index=index, error=status)


def error_of(status: inference_pb2.InferStatus) -> SplitVaultError:
    """The error a failed request of a batch stands for, read as an ``Infer`` status is
    (``shared.errors.error_from_grpc``); a code gRPC does not know is an internal error."""
    code = _CODES.get(status.code, grpc.StatusCode.UNKNOWN)
    return error_from_grpc(code, status.message, list(status.trailers.items()))


def runs(sizes: Sequence[int], limit: int, most: int = MAX_REQUESTS) -> list[tuple[int, int]]:
    """Consecutive ``[start, stop)`` runs of messages of ``sizes`` bytes, each run of at most
    ``most`` messages and ``limit`` bytes as one batch message. A message too large alone
    makes a run alone (and fails as it would have failed alone)."""
    found: list[tuple[int, int]] = []
    start, total = 0, 0
    for index, size in enumerate(sizes):
        cost = size + FRAMING_BYTES
        if index > start and (index - start == most or total + cost > limit):
            found.append((start, index))
            start, total = index, 0
        total += cost
    if sizes:
        found.append((start, len(sizes)))
    return found
