"""``shared.batch_rpc``: a request's failure inside an ``InferBatch`` call reads back as the
same error its own ``Infer`` call would have given, and batch messages are cut to their limits.
"""

from __future__ import annotations

from typing import Any

import pytest

from private_core.settings import PrivateSettings
from protos import inference_pb2
from public_api.settings import PublicSettings
from shared.batch_rpc import (
    FRAMING_BYTES,
    MAX_BATCH_BYTES,
    MAX_REQUESTS,
    error_of,
    failed,
    runs,
)
from shared.errors import (
    ERROR_TABLE,
    SplitVaultError,
    error_from_grpc,
    grpc_trailers,
    mapping_for,
)


def _as_infer_would(error: SplitVaultError) -> SplitVaultError:
    """What the public tier reads from an ``Infer`` call aborted with ``error``."""
    return error_from_grpc(mapping_for(error).grpc_code, error.message, grpc_trailers(error))


@pytest.mark.parametrize("cls", list(ERROR_TABLE), ids=lambda cls: cls.__name__)
def test_a_failed_request_reads_back_as_its_own_infer_call_would(
    cls: type[SplitVaultError],
) -> None:
    error = cls("what the private tier said", retry_after_s=2.5)
    result = inference_pb2.InferResult.FromString(failed(7, error).SerializeToString())
    assert result.index == 7 and result.WhichOneof("outcome") == "error"
    read, expected = error_of(result.error), _as_infer_would(error)
    assert type(read) is type(expected)
    assert (read.message, read.retry_after_s) == (expected.message, expected.retry_after_s)


def test_a_status_code_grpc_does_not_know_is_an_internal_error() -> None:
    read = error_of(inference_pb2.InferStatus(code=999, message="?"))
    assert type(read).__name__ == "InternalError"


def test_runs_cut_at_the_request_count() -> None:
    found = runs([10] * (2 * MAX_REQUESTS + 1), limit=10**9)
    assert found == [(0, MAX_REQUESTS), (MAX_REQUESTS, 2 * MAX_REQUESTS), (128, 129)]


def test_runs_cut_at_the_byte_limit_and_a_large_message_goes_alone() -> None:
    unit = 100 + FRAMING_BYTES
    sizes = [100, 100, 100, 5000, 100]
    assert runs(sizes, limit=2 * unit) == [(0, 2), (2, 3), (3, 4), (4, 5)]
    assert runs(sizes, limit=3 * unit) == [(0, 3), (3, 4), (4, 5)]
    assert runs([], limit=1) == []


def test_runs_fit_what_protobuf_actually_sends() -> None:
    """The framing allowance covers a request's tag and length in the batch message."""
    big = inference_pb2.InferRequest(
        model="m", inputs=[inference_pb2.Tensor(name="x", data=b"\0" * 300_000)]
    )
    requests = [big] * 5
    limit = 3 * (big.ByteSize() + FRAMING_BYTES)
    for start, stop in runs([r.ByteSize() for r in requests], limit):
        message = inference_pb2.InferBatchRequest(requests=requests[start:stop])
        assert message.ByteSize() <= limit


@pytest.mark.parametrize("settings", [PrivateSettings, PublicSettings], ids=lambda s: s.__name__)
def test_a_batch_message_fits_the_smallest_limit_a_tier_accepts(settings: type[Any]) -> None:
    """A batch never fails whole on a message limit that each request would pass alone."""
    (smallest,) = [
        m.ge for m in settings.model_fields["max_message_mb"].metadata if hasattr(m, "ge")
    ]
    assert smallest * 1024 * 1024 >= MAX_BATCH_BYTES
