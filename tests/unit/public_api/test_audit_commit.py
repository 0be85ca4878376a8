"""Group commit of the audit trail (``AuditTrail.submit``): real SQLite files, real threads."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from concurrent.futures import Future, wait
from pathlib import Path

import pytest

from public_api.audit import AuditRecord, VerifyResult, export_records, verify_chain
from public_api.audit_writer import AuditTrail
from shared.errors import Unavailable

FAIL_INSERTS = (
    "CREATE TRIGGER fail_inserts BEFORE INSERT ON audit "
    "BEGIN SELECT RAISE(ABORT, 'storage refuses'); END"
)


def _record(i: int) -> AuditRecord:
    return AuditRecord(
        time=1_700_000_000.0 + i,
        key_id="k_0000000a",
        client="10.0.0.1",
        model="digits",
        input_sha256=None,
        answer='{"label":1}',
        decision="served",
        status=200,
        request_id=f"req-{i}",
    )


@pytest.fixture
def path(tmp_path: Path) -> Path:
    path = tmp_path / "state" / "audit.sqlite3"
    AuditTrail.open(path).close()
    return path


@pytest.fixture
def locked(path: Path) -> Iterator[sqlite3.Connection]:
    """Another connection holding the database's write lock until the test commits."""
    raw = sqlite3.connect(path, isolation_level=None)
    raw.execute("BEGIN IMMEDIATE")
    yield raw
    if raw.in_transaction:
        raw.execute("COMMIT")
    raw.close()


def _sql(path: Path, statement: str) -> None:
    with sqlite3.connect(path) as raw:
        raw.execute(statement)


def _request_ids(path: Path) -> list[str]:
    return [str(row["request_id"]) for row in export_records(path, "k_0000000a")]


def test_a_submitted_record_is_committed_when_its_future_resolves(path: Path) -> None:
    # The writer would wait a minute before writing an appended record: only submit wakes it.
    with AuditTrail.open(path, flush_interval_s=60.0) as trail:
        assert trail.commits_before_response
        seq = trail.submit(_record(0)).result(timeout=30)
        assert seq == 1
        assert _request_ids(path) == ["req-0"]  # read by another connection: committed


def test_records_submitted_during_a_commit_share_the_next_one(
    path: Path, locked: sqlite3.Connection
) -> None:
    trail = AuditTrail.open(path, busy_timeout_s=30.0, flush_interval_s=60.0)
    commits: list[int] = []
    trail.add_commit_listener(lambda seq, _: commits.append(seq))
    first = trail.submit(_record(0))  # taken by the writer, which waits for the lock
    later = [trail.submit(_record(i)) for i in range(1, 41)]  # queued behind it
    locked.execute("COMMIT")
    wait([first, *later], timeout=30)
    trail.close()
    assert sorted(f.result() for f in [first, *later]) == list(range(1, 42))
    assert commits[-1] == 41 and len(commits) <= 3  # grouped, not one commit per record
    assert verify_chain(path) == VerifyResult(True, 41)


def test_a_failed_commit_fails_its_records_and_drops_them(path: Path) -> None:
    trail = AuditTrail.open(path, retry_interval_s=0.05)
    trail.submit(_record(0)).result(timeout=30)
    _sql(path, FAIL_INSERTS)
    failed: Future[int] = trail.submit(_record(1))
    with pytest.raises(Unavailable, match=r"audit trail cannot write: .*storage refuses") as error:
        failed.result(timeout=30)
    assert error.value.retry_after_s == 1.0
    assert trail.pending == 0  # dropped: its request is answered 503, recorded as such
    _sql(path, "DROP TRIGGER fail_inserts")
    refusals: list[str] = []
    while True:  # let through again once the retry interval has passed (no record held)
        try:
            later = trail.submit(_record(2))
            break
        except Unavailable as refused:
            refusals.append(refused.message)
    assert all("storage refuses" in message for message in refusals)
    assert later.result(timeout=30) == 2
    assert trail.failure is None
    trail.close()
    assert _request_ids(path) == ["req-0", "req-2"]
    assert verify_chain(path) == VerifyResult(True, 2)


def test_a_failed_commit_keeps_appended_records_for_the_retry(path: Path) -> None:
    trail = AuditTrail.open(path, retry_interval_s=0.05, flush_interval_s=60.0)
    _sql(path, FAIL_INSERTS)
    trail.append(_record(0))  # a refusal's record: nobody waits for it
    submitted = trail.submit(_record(1))  # wakes the writer: both in one failing commit
    with pytest.raises(Unavailable):
        submitted.result(timeout=30)
    assert trail.pending == 1
    with pytest.raises(Unavailable, match="cannot write"):  # held for retry: refuse meanwhile
        trail.check_accepting()
    _sql(path, "DROP TRIGGER fail_inserts")
    trail.close()  # writes what it holds
    assert _request_ids(path) == ["req-0"]
    assert verify_chain(path) == VerifyResult(True, 1)


def test_the_buffer_policy_bounds_unwritten_records_while_healthy(
    path: Path, locked: sqlite3.Connection
) -> None:
    """What a crash may lose under "buffer": the writer is slow, not failing, and still at most
    ``buffer_max`` records wait."""
    trail = AuditTrail.open(path, busy_timeout_s=30.0, on_failure="buffer", buffer_max=5)
    assert not trail.commits_before_response
    for i in range(5):
        trail.append(_record(i))
    with pytest.raises(Unavailable, match="5 records waiting to be written") as error:
        trail.append(_record(5))
    assert error.value.retry_after_s == 1.0
    locked.execute("COMMIT")
    trail.close()
    assert verify_chain(path) == VerifyResult(True, 5)
