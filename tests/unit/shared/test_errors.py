"""The one error table: HTTP statuses, gRPC codes, and errors read back from the private tier."""

from __future__ import annotations

import re

import grpc
import pytest

import shared.errors as errors_module
from shared.errors import (
    ERROR_TABLE,
    FROM_GRPC,
    IDENTITY_REFUSED,
    DeadlineExceeded,
    IdentityBudgetExhausted,
    InternalError,
    InvalidInput,
    KeyBudgetExhausted,
    ModelLoadError,
    ModelNotFound,
    ModelNotReady,
    Overloaded,
    PayloadTooLarge,
    PermissionDenied,
    RateLimited,
    SplitVaultError,
    Unauthenticated,
    Unavailable,
    error_from_grpc,
    grpc_trailers,
    mapping_for,
)

Code = grpc.StatusCode

# The module docstring's table, written out: class -> (HTTP status, gRPC code).
EXPECTED = {
    InvalidInput: (400, Code.INVALID_ARGUMENT),
    PayloadTooLarge: (413, Code.INVALID_ARGUMENT),
    Unauthenticated: (401, Code.UNAUTHENTICATED),
    PermissionDenied: (403, Code.PERMISSION_DENIED),
    ModelNotFound: (404, Code.NOT_FOUND),
    RateLimited: (429, Code.RESOURCE_EXHAUSTED),
    KeyBudgetExhausted: (429, Code.RESOURCE_EXHAUSTED),
    IdentityBudgetExhausted: (503, Code.RESOURCE_EXHAUSTED),
    Unavailable: (503, Code.UNAVAILABLE),
    ModelNotReady: (503, Code.FAILED_PRECONDITION),
    Overloaded: (503, Code.RESOURCE_EXHAUSTED),
    DeadlineExceeded: (503, Code.DEADLINE_EXCEEDED),
    ModelLoadError: (503, Code.FAILED_PRECONDITION),  # never served: reads as "not ready"
    InternalError: (500, Code.INTERNAL),
}

# What the private tier's servicer can abort with, and what the public tier reads back.
SENT_BY_PRIVATE = [
    InvalidInput, ModelNotFound, ModelNotReady, Overloaded, DeadlineExceeded, Unavailable,
    InternalError, IdentityBudgetExhausted, KeyBudgetExhausted,
]  # fmt: skip
_TREE_LINE = re.compile(
    r"^(?P<indent>[│ ]*)[├└]── (?P<name>\w+)\s*(?P<status>\d{3})?\s*(?P<code>[A-Z_]+)?"
)


def _docstring_tree() -> list[tuple[str, str, int | None, str | None]]:
    """(class, parent, HTTP status, gRPC code) for each line of the module docstring's tree."""
    rows = []
    parents = ["SplitVaultError"]
    for line in (errors_module.__doc__ or "").splitlines():
        match = _TREE_LINE.match(line.removeprefix("    "))
        if match is None:
            continue
        depth = len(match["indent"]) // 4
        del parents[depth + 1 :]
        status = int(match["status"]) if match["status"] else None
        rows.append((match["name"], parents[depth], status, match["code"]))
        parents.append(match["name"])
    return rows


@pytest.mark.parametrize(("cls", "expected"), list(EXPECTED.items()), ids=lambda v: str(v))
def test_each_class_maps_to_its_status_and_code(
    cls: type[SplitVaultError], expected: tuple[int, grpc.StatusCode]
) -> None:
    mapping = mapping_for(cls("boom"))
    assert (mapping.http_status, mapping.grpc_code) == expected


def test_the_docstring_tree_matches_the_classes_and_the_table() -> None:
    rows = _docstring_tree()
    assert {name for name, *_ in rows} >= {cls.__name__ for cls in EXPECTED}
    for name, parent, status, code in rows:
        cls = getattr(errors_module, name)
        assert issubclass(cls, getattr(errors_module, parent)), (name, parent)
        mapping = mapping_for(cls("boom"))
        if status is not None:
            assert mapping.http_status == status, name
        if code is not None:
            assert mapping.grpc_code == Code.__members__[code], name


def test_every_table_entry_is_an_error_class() -> None:
    for cls in ERROR_TABLE:
        assert issubclass(cls, SplitVaultError)
        assert 400 <= ERROR_TABLE[cls].http_status <= 599


def test_mapping_for_picks_the_most_specific_class() -> None:
    class TooManyTokens(PayloadTooLarge):
        pass

    class BadShape(InvalidInput):
        pass

    class Shedding(Overloaded):
        pass

    class Mystery(SplitVaultError):
        pass

    assert mapping_for(TooManyTokens("x")).http_status == 413  # not InvalidInput's 400
    assert mapping_for(BadShape("x")).http_status == 400
    assert mapping_for(Shedding("x")).grpc_code == Code.RESOURCE_EXHAUSTED  # not UNAVAILABLE
    assert mapping_for(ModelNotReady("x")).grpc_code == Code.FAILED_PRECONDITION
    assert mapping_for(Mystery("x")) == ERROR_TABLE[InternalError]  # unknown: 500


def test_error_keeps_its_message_and_retry_hint() -> None:
    error = Overloaded("queue full", retry_after_s=2.5)
    assert error.message == "queue full"
    assert str(error) == "queue full"
    assert error.retry_after_s == 2.5
    assert InvalidInput("bad").retry_after_s is None


@pytest.mark.parametrize("cls", SENT_BY_PRIVATE, ids=lambda c: c.__name__)
def test_error_from_grpc_round_trips_what_the_private_tier_sends(
    cls: type[SplitVaultError],
) -> None:
    sent = cls("detail 42")
    received = error_from_grpc(mapping_for(sent).grpc_code, sent.message, grpc_trailers(sent))
    assert type(received) is cls
    # Details the gRPC library may write (timeouts, connection failures) are replaced.
    expected = ERROR_TABLE[cls].peer_message or "detail 42"
    assert expected in received.message
    assert mapping_for(received).http_status == mapping_for(sent).http_status
    if issubclass(cls, Unavailable):
        assert received.retry_after_s is not None and received.retry_after_s > 0
    else:
        assert received.retry_after_s is None


@pytest.mark.parametrize(
    ("cls", "status"), [(IdentityBudgetExhausted, 503), (KeyBudgetExhausted, 429)]
)
def test_a_private_budget_refusal_reads_back_with_its_retry_hint(
    cls: type[SplitVaultError], status: int
) -> None:
    sent = cls("budget used up", retry_after_s=3600.25)
    received = error_from_grpc(Code.RESOURCE_EXHAUSTED, sent.message, grpc_trailers(sent))
    assert type(received) is cls
    assert mapping_for(received).http_status == status
    assert received.retry_after_s == pytest.approx(3600.25)


def test_resource_exhausted_without_a_reason_is_the_queue() -> None:
    received = error_from_grpc(Code.RESOURCE_EXHAUSTED, "queue full")
    assert type(received) is Overloaded
    unknown = error_from_grpc(Code.RESOURCE_EXHAUSTED, "x", [("splitvault-reason", "other")])
    assert type(unknown) is Overloaded


@pytest.mark.parametrize("hint", ["nan", "-5", "0", "soon", "inf"])
def test_a_bad_retry_hint_is_ignored_or_bounded(hint: str) -> None:
    trailers = [("splitvault-reason", "identity_budget"), ("splitvault-retry-after-s", hint)]
    received = error_from_grpc(Code.RESOURCE_EXHAUSTED, "x", trailers)
    assert received.retry_after_s is not None
    assert 0 < received.retry_after_s <= 86_400


def test_the_codes_read_back_are_derived_from_the_one_table() -> None:
    derived = {
        (mapping.grpc_code, mapping.reason): cls
        for cls, mapping in ERROR_TABLE.items()
        if mapping.read_back
    }
    assert derived == FROM_GRPC
    marked = [(m.grpc_code, m.reason) for m in ERROR_TABLE.values() if m.read_back]
    assert len(marked) == len(set(marked))  # one class per code and reason
    assert {(m.grpc_code, None) for m in ERROR_TABLE.values()} <= set(FROM_GRPC)
    for (code, reason), cls in FROM_GRPC.items():
        assert (mapping_for(cls).grpc_code, mapping_for(cls).reason) == (code, reason)


@pytest.mark.parametrize(
    "code", [Code.UNAVAILABLE, Code.DEADLINE_EXCEEDED, Code.INTERNAL], ids=lambda c: c.name
)
def test_transport_details_never_reach_the_client(code: grpc.StatusCode) -> None:
    details = "failed to connect to all addresses; last error: ipv4:10.0.0.5:50051"
    received = error_from_grpc(code, details)
    assert "10.0.0.5" not in received.message


def test_payload_too_large_from_grpc_is_still_a_client_error() -> None:
    received = error_from_grpc(mapping_for(PayloadTooLarge("big")).grpc_code, "big")
    assert isinstance(received, InvalidInput)
    assert mapping_for(received).http_status == 400


def test_a_model_that_failed_to_load_reads_back_as_not_ready() -> None:
    received = error_from_grpc(mapping_for(ModelLoadError("bad key")).grpc_code, "bad key")
    assert isinstance(received, ModelNotReady)
    assert mapping_for(received).http_status == 503


@pytest.mark.parametrize("code", [Code.UNAUTHENTICATED, Code.PERMISSION_DENIED])
def test_identity_refusal_is_unavailable_without_details(code: grpc.StatusCode) -> None:
    received = error_from_grpc(code, "peer CN=evil not in allow list")
    assert type(received) is Unavailable
    assert "evil" not in received.message
    assert received.message == IDENTITY_REFUSED
    assert received.retry_after_s == 5.0


@pytest.mark.parametrize("code", [Code.UNKNOWN, Code.INTERNAL, Code.DATA_LOSS, Code.ABORTED])
def test_unexpected_codes_are_internal_errors(code: grpc.StatusCode) -> None:
    received = error_from_grpc(code, "whatever")
    assert type(received) is InternalError
    assert "whatever" not in received.message
    assert mapping_for(received).http_status == 500
