"""Tests of the hash-chained audit trail: real SQLite files, real threads, real tampering."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from public_api.audit import (
    GENESIS_HASH,
    AuditRecord,
    VerifyResult,
    export_records,
    head,
    input_digest,
    record_hash,
    verify_chain,
)
from public_api.audit_tally import OTHER_CLIENTS, RefusalTally, Tallied
from public_api.audit_writer import AuditTrail
from shared.errors import Unavailable

DECISIONS = ["served", "rate_limited", "blocked", "unauthenticated"]


def _record(i: int, key_id: str | None = "k_0000000a") -> AuditRecord:
    decision = DECISIONS[i % len(DECISIONS)]
    return AuditRecord(
        time=1_700_000_000.0 + i / 7,
        key_id=key_id,
        client=f"10.0.0.{i % 250}",
        model="digits",
        input_sha256=hashlib.sha256(str(i).encode()).hexdigest(),
        answer=json.dumps({"label": i % 10}, separators=(",", ":"))
        if decision == "served"
        else None,
        decision=decision,
        status=200 if decision == "served" else 429,
        monitor_score=(i % 100) / 97,
        request_id=f"req-{i}",
    )


def _wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "audit.sqlite3"


def _fill(path: Path, count: int) -> None:
    with AuditTrail.open(path) as trail:
        for i in range(count):
            trail.append(_record(i))


@pytest.fixture
def thirty(path: Path) -> Path:
    """A closed trail of 30 records."""
    _fill(path, 30)
    return path


def _sql(path: Path, *statements: str) -> None:
    with sqlite3.connect(path) as raw:
        for statement in statements:
            raw.execute(statement)


def test_records_appended_from_many_threads_form_one_valid_chain(path: Path) -> None:
    with AuditTrail.open(path, batch_size=64) as trail:

        def work(thread: int) -> None:
            for i in range(1000):
                trail.append(_record(thread * 10_000 + i, key_id=f"k_0000000{thread}"))

        threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        trail.flush()
        assert (trail.written, trail.pending, trail.failure) == (4000, 0, None)
    result = verify_chain(path)
    assert (result.ok, result.records, result.first_bad_seq, result.problem) == (
        True,
        4000,
        None,
        None,
    )
    assert head(path)[0] == 4000
    assert len(list(export_records(path, "k_00000002"))) == 1000


def test_two_writers_sharing_one_file_keep_one_chain(path: Path) -> None:
    """Two trails on one file, as two public replicas would be, interleave without a fork."""
    first = AuditTrail.open(path, flush_interval_s=0.001)
    second = AuditTrail.open(path, flush_interval_s=0.001)
    for i in range(200):
        (first if i % 2 else second).append(_record(i, key_id=("k_0000000a", "k_0000000b")[i % 2]))
        if i % 25 == 0:
            first.flush()
    first.close()
    second.close()
    assert verify_chain(path) == VerifyResult(True, 200)
    assert len(list(export_records(path, "k_0000000b"))) == 100


def test_flush_wakes_an_idle_writer_at_once(path: Path) -> None:
    with AuditTrail.open(path, flush_interval_s=60.0) as trail:
        trail.append(_record(0))
        # Raises TimeoutError unless the writer wakes before its 60 s interval: no wall-clock
        # bound of ours is needed (30 s only leaves room for a loaded machine).
        trail.flush(timeout=30.0)
        assert trail.written == 1


def test_the_stored_hash_is_sha256_of_the_documented_canonical_json(thirty: Path) -> None:
    rows = list(export_records(thirty, "k_0000000a"))
    assert rows[0]["prev_hash"] == GENESIS_HASH
    for row in rows:
        content = {name: value for name, value in row.items() if name != "hash"}
        canonical = json.dumps(content, sort_keys=True, separators=(",", ":")).encode()
        assert row["hash"] == hashlib.sha256(canonical).hexdigest()
    assert [row["prev_hash"] for row in rows[1:]] == [row["hash"] for row in rows[:-1]]


def test_the_chain_continues_after_close_and_reopen(path: Path) -> None:
    _fill(path, 5)
    five = head(path)
    _fill(path, 5)
    assert verify_chain(path) == VerifyResult(True, 10)
    rows = list(export_records(path, "k_0000000a"))
    assert [row["seq"] for row in rows] == list(range(1, 11))
    assert rows[5]["prev_hash"] == five[1]


def test_an_edited_field_is_found(thirty: Path) -> None:
    _sql(thirty, "UPDATE audit SET decision = 'blocked', status = 403 WHERE seq = 17")
    result = verify_chain(thirty)
    assert not result.ok and result.records == 30
    assert result.first_bad_seq == 17
    assert result.problem == "record 17: hash does not match its contents"


def test_an_edited_float_is_found(thirty: Path) -> None:
    _sql(thirty, "UPDATE audit SET monitor_score = monitor_score + 1e-9 WHERE seq = 4")
    assert verify_chain(thirty).first_bad_seq == 4


def test_a_value_of_a_foreign_type_is_found(thirty: Path) -> None:
    with sqlite3.connect(thirty) as raw:
        raw.execute("UPDATE audit SET answer = ? WHERE seq = 9", (b'{"label":1}',))
    result = verify_chain(thirty)
    assert (result.first_bad_seq, result.problem) == (
        9,
        "record 9: a field holds a value the trail never writes",
    )


def test_a_deleted_middle_record_is_found(thirty: Path) -> None:
    _sql(thirty, "DELETE FROM audit WHERE seq = 18")
    result = verify_chain(thirty)
    assert (result.ok, result.records, result.first_bad_seq) == (False, 29, 18)
    assert result.problem == "record 18 missing (gap after 17)"


def test_deleted_first_and_several_records_are_found(thirty: Path) -> None:
    _sql(thirty, "DELETE FROM audit WHERE seq IN (10, 11, 12)")
    assert verify_chain(thirty).problem == "records 10-12 missing (gap after 9)"
    _sql(thirty, "DELETE FROM audit WHERE seq = 1")
    result = verify_chain(thirty)
    assert result.first_bad_seq == 1
    assert result.problem == "record 1 missing (the trail starts at record 2)"


def test_a_forged_record_appended_at_the_end_is_found(thirty: Path) -> None:
    last_seq, last_hash = head(thirty)
    with sqlite3.connect(thirty) as raw:
        raw.execute(
            "INSERT INTO audit (seq, time, key_id, client, model, input_sha256, answer, decision,"
            " status, monitor_score, request_id, prev_hash, hash)"
            " VALUES (?, 1.0, 'k_0000000a', '1.2.3.4', 'digits', NULL, NULL, 'served', 200,"
            " 0.0, NULL, ?, ?)",
            (last_seq + 1, last_hash, "f" * 64),
        )
    result = verify_chain(thirty)
    assert result.first_bad_seq == 31
    assert result.problem == "record 31: hash does not match its contents"


def test_a_forged_record_inserted_in_the_middle_is_found(thirty: Path) -> None:
    """The forger renumbers later rows and even gives the forged row a valid hash."""
    rows = {row["seq"]: row for row in export_records(thirty, "k_0000000a")}
    forged = {name: rows[18][name] for name in rows[18] if name not in ("seq", "hash")}
    forged.update(decision="served", status=200, prev_hash=rows[17]["hash"])
    values = {name: value for name, value in forged.items() if name != "prev_hash"}
    digest = record_hash(18, values, rows[17]["hash"])
    _sql(
        thirty,
        "UPDATE audit SET seq = -seq WHERE seq >= 18",
        "UPDATE audit SET seq = 1 - seq WHERE seq < 0",
    )
    with sqlite3.connect(thirty) as raw:
        raw.execute(
            "INSERT INTO audit (seq, time, key_id, client, model, input_sha256, answer, decision,"
            " status, monitor_score, request_id, prev_hash, hash)"
            " VALUES (18, :time, :key_id, :client, :model, :input_sha256, :answer, :decision,"
            " :status, :monitor_score, :request_id, :prev_hash, :hash)",
            {**forged, "hash": digest},
        )
    result = verify_chain(thirty)
    assert (result.records, result.first_bad_seq) == (31, 19)
    assert result.problem is not None
    assert result.problem.startswith("record 19: prev_hash does not match the hash of record 18")


def test_two_swapped_records_are_found(thirty: Path) -> None:
    """Whole rows (contents, hash and prev_hash) trade places."""
    _sql(
        thirty,
        "UPDATE audit SET seq = -10 WHERE seq = 10",
        "UPDATE audit SET seq = 10 WHERE seq = 11",
        "UPDATE audit SET seq = 11 WHERE seq = -10",
    )
    result = verify_chain(thirty)
    assert result.first_bad_seq == 10
    assert result.problem is not None
    assert result.problem.startswith("record 10: prev_hash does not match the hash of record 9")


def test_swapped_contents_under_the_original_hashes_are_found(thirty: Path) -> None:
    fields = "time, client, input_sha256, answer, decision, status, monitor_score, request_id"
    with sqlite3.connect(thirty) as raw:
        select = f"SELECT {fields} FROM audit WHERE seq = ?"  # noqa: S608
        eleven, twelve = (raw.execute(select, (seq,)).fetchone() for seq in (11, 12))
        update = "UPDATE audit SET {} WHERE seq = ?".format(  # noqa: S608
            ", ".join(f"{name} = ?" for name in fields.split(", "))
        )
        raw.execute(update, (*twelve, 11))
        raw.execute(update, (*eleven, 12))
    result = verify_chain(thirty)
    assert (result.first_bad_seq, result.problem) == (
        11,
        "record 11: hash does not match its contents",
    )


def test_truncation_and_rewrites_are_caught_only_by_an_anchored_head(thirty: Path) -> None:
    anchored = head(thirty)
    assert anchored[0] == 30
    _sql(thirty, "DELETE FROM audit WHERE seq > 25")
    assert verify_chain(thirty).ok  # a plain chain cannot see a cut tail ...
    assert head(thirty) != anchored  # ... the anchored head can
    assert head(thirty)[0] == 25


def test_a_rewritten_chain_is_caught_only_by_an_anchored_head(thirty: Path) -> None:
    """Editing record 17 and recomputing every later hash fools the chain, not the anchor."""
    anchored = head(thirty)
    rows = list(export_records(thirty, "k_0000000a"))
    prev_hash = rows[15]["hash"]
    with sqlite3.connect(thirty) as raw:
        for row in rows[16:]:
            values = {name: row[name] for name in row if name not in ("seq", "prev_hash", "hash")}
            if row["seq"] == 17:
                values["decision"], values["status"] = "blocked", 403
            digest = record_hash(row["seq"], values, prev_hash)
            raw.execute(
                "UPDATE audit SET decision = ?, status = ?, prev_hash = ?, hash = ? WHERE seq = ?",
                (values["decision"], values["status"], prev_hash, digest, row["seq"]),
            )
            prev_hash = digest
    assert verify_chain(thirty).ok
    assert head(thirty)[0] == anchored[0] and head(thirty) != anchored


def test_a_dropped_table_is_reported(thirty: Path) -> None:
    _sql(thirty, "DROP TABLE audit")
    result = verify_chain(thirty)
    assert not result.ok and result.problem is not None
    assert "no such table" in result.problem


def test_reading_a_missing_trail_fails_without_creating_it(tmp_path: Path) -> None:
    missing = tmp_path / "none.sqlite3"
    with pytest.raises(FileNotFoundError):
        verify_chain(missing)
    with pytest.raises(FileNotFoundError):
        head(missing)
    with pytest.raises(FileNotFoundError):
        list(export_records(missing, "k_0000000a"))
    assert not missing.exists()


def test_an_empty_trail_verifies_and_has_the_genesis_head(path: Path) -> None:
    AuditTrail.open(path).close()
    assert verify_chain(path).ok
    assert head(path) == (0, GENESIS_HASH)


def test_export_returns_only_that_keys_records(path: Path) -> None:
    appended = [_record(i, key_id=("k_0000000a", "k_0000000b", None)[i % 3]) for i in range(30)]
    with AuditTrail.open(path) as trail:
        for record in appended:
            trail.append(record)
    exported = list(export_records(path, "k_0000000b"))
    assert [row["seq"] for row in exported] == list(range(2, 31, 3))
    for row, record in zip(exported, appended[1::3], strict=True):
        fields = {name: value for name, value in asdict(record).items() if name != "count"}
        assert {name: row[name] for name in fields} == fields
        assert "count" not in row  # a record of one request exports (and hashes) as before
        assert set(row) >= {"seq", "hash", "prev_hash"}
    assert json.loads(json.dumps(exported)) == exported
    assert list(export_records(path, "k_ffffffff")) == []


@pytest.fixture
def locked(path: Path) -> Iterator[sqlite3.Connection]:
    """Another connection holding the database's write lock until the test commits."""
    AuditTrail.open(path).close()
    raw = sqlite3.connect(path, isolation_level=None)
    raw.execute("BEGIN IMMEDIATE")
    yield raw
    if raw.in_transaction:
        raw.execute("COMMIT")
    raw.close()


def test_a_full_queue_refuses_records(path: Path, locked: sqlite3.Connection) -> None:
    trail = AuditTrail.open(path, batch_size=1, max_pending=5, busy_timeout_s=30.0)
    refusals: list[Unavailable] = []
    for i in range(100):
        try:
            trail.append(_record(i))
        except Unavailable as error:
            refusals.append(error)
    accepted = 100 - len(refusals)
    assert 5 <= accepted <= 6  # the queue plus the one record the blocked writer holds
    assert {(error.message, error.retry_after_s) for error in refusals} == {
        ("audit trail is not keeping up", 1.0)
    }
    locked.execute("COMMIT")
    trail.flush()
    trail.close()
    assert verify_chain(path) == VerifyResult(True, accepted)


def test_a_failing_write_refuses_records_until_it_recovers(
    path: Path, locked: sqlite3.Connection
) -> None:
    trail = AuditTrail.open(path, busy_timeout_s=0.05, retry_interval_s=0.05)
    trail.append(_record(0))
    _wait_for(lambda: trail.failure is not None)
    assert "database is locked" in str(trail.failure)
    with pytest.raises(Unavailable, match=r"audit trail cannot write: .*database is locked"):
        trail.append(_record(1))
    with pytest.raises(Unavailable, match="database is locked"):
        trail.flush()
    locked.execute("COMMIT")
    _wait_for(lambda: trail.failure is None)
    trail.append(_record(2))
    trail.flush()
    trail.close()
    assert trail.written == 2
    assert verify_chain(path) == VerifyResult(True, 2)


def test_the_buffer_policy_accepts_up_to_its_bound_while_failing_then_writes_all(
    path: Path, locked: sqlite3.Connection
) -> None:
    trail = AuditTrail.open(
        path, busy_timeout_s=0.05, retry_interval_s=0.05, on_failure="buffer", buffer_max=5
    )
    trail.append(_record(0))
    _wait_for(lambda: trail.failure is not None)
    trail.check_accepting()  # failing, but the buffer has room
    for i in range(1, 5):
        trail.append(_record(i))
    assert trail.pending == 5
    with pytest.raises(Unavailable, match=r"buffer of 5 records is full: .*database is locked"):
        trail.check_accepting()
    with pytest.raises(Unavailable, match="buffer of 5 records is full"):
        trail.append(_record(5))
    locked.execute("COMMIT")
    _wait_for(lambda: trail.failure is None and trail.pending == 0)
    trail.append(_record(6))
    trail.close()
    assert trail.written == 6
    assert verify_chain(path) == VerifyResult(True, 6)
    assert [r["request_id"] for r in export_records(path, "k_0000000a")] == [
        f"req-{i}" for i in (0, 1, 2, 3, 4, 6)
    ]


def test_the_refuse_policy_refuses_before_any_work_while_failing(
    path: Path, locked: sqlite3.Connection
) -> None:
    trail = AuditTrail.open(path, busy_timeout_s=0.05, retry_interval_s=0.05)
    trail.check_accepting()
    trail.append(_record(0))
    _wait_for(lambda: trail.failure is not None)
    with pytest.raises(Unavailable, match="audit trail cannot write"):
        trail.check_accepting()
    locked.execute("COMMIT")
    _wait_for(lambda: trail.failure is None)
    trail.check_accepting()
    trail.close()
    assert verify_chain(path) == VerifyResult(True, 1)


def test_an_unknown_failure_policy_is_refused(path: Path) -> None:
    with pytest.raises(ValueError, match="failure policy"):
        AuditTrail.open(path, on_failure="drop")  # type: ignore[arg-type]


def test_a_permanent_failure_is_reported_and_close_says_what_was_lost(path: Path) -> None:
    trail = AuditTrail.open(path, retry_interval_s=0.05)
    trail.append(_record(0))
    trail.flush()
    _sql(path, "DROP TABLE audit")
    trail.append(_record(1))
    _wait_for(lambda: trail.failure is not None)
    assert "no such table" in str(trail.failure)
    with pytest.raises(Unavailable, match="no such table"):
        trail.append(_record(2))
    with pytest.raises(Unavailable, match="closed with 1 records unwritten"):
        trail.close()


def test_an_unwritable_location_fails_at_open(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the state folder should be")
    with pytest.raises((FileExistsError, NotADirectoryError)):
        AuditTrail.open(blocker / "audit.sqlite3")


def test_append_after_close_is_refused(path: Path) -> None:
    trail = AuditTrail.open(path)
    trail.close()
    trail.close()
    with pytest.raises(Unavailable, match="closed"):
        trail.append(_record(0))


def test_records_are_validated_and_normalised(path: Path) -> None:
    with pytest.raises(ValueError, match="unknown audit decision"):
        AuditRecord(1.0, None, "1.2.3.4", None, None, None, "maybe", 200)
    with pytest.raises(ValueError, match="finite"):
        AuditRecord(1.0, None, "1.2.3.4", None, None, None, "served", 200, float("nan"))
    with pytest.raises(ValueError, match="finite"):
        AuditRecord(float("inf"), None, "1.2.3.4", None, None, None, "served", 200)
    record = AuditRecord(1, None, "1.2.3.4", None, None, None, "served", 200, 0)
    assert isinstance(record.time, float) and isinstance(record.monitor_score, float)
    with AuditTrail.open(path) as trail:
        trail.append(record)
    assert verify_chain(path).ok


def test_input_digest_is_canonical() -> None:
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    ids = np.array([[1, 2, 3]], dtype=np.int64)
    base = input_digest({"x": x, "ids": ids})
    assert base == input_digest({"ids": ids.copy(), "x": x.copy()})
    assert len(base) == 64 and int(base, 16) >= 0
    assert input_digest({"x": np.asfortranarray(x)}) == input_digest({"x": x})
    variants: list[dict[str, np.ndarray[Any, Any]]] = [
        {"x": x.astype(np.float64), "ids": ids},
        {"x": x.reshape(4, 3), "ids": ids},
        {"y": x, "ids": ids},
        {"x": x + np.float32(1e-6), "ids": ids},
        {"x": x},
        {"x": np.array(3.0)},
        {"x": np.array([3.0])},
    ]
    digests = {input_digest(arrays) for arrays in variants} | {base}
    assert len(digests) == len(variants) + 1
    with pytest.raises(ValueError, match="object dtype"):
        input_digest({"x": np.array(["a", None], dtype=object)})


# --- aggregated refusals ------------------------------------------------------------------


def test_a_trail_from_before_count_verifies_migrates_and_chains_on(path: Path) -> None:
    """A trail written before ``count`` existed: rows without the column keep their hashes."""
    _fill(path, 5)
    _sql(
        path,
        "CREATE TABLE old AS SELECT seq, time, key_id, client, model, input_sha256, answer,"
        " decision, status, monitor_score, request_id, prev_hash, hash FROM audit",
        "DROP TABLE audit",
        "ALTER TABLE old RENAME TO audit",
    )
    assert verify_chain(path) == VerifyResult(True, 5)  # read-only: no migration
    tallied = Tallied("10.9.8.7", "digits", "unauthenticated", 401)
    with AuditTrail.open(path, aggregate_s=60) as trail:  # migrates, then chains on
        trail.append(_record(5))
        for _ in range(3):
            trail.tally(tallied)
    assert verify_chain(path) == VerifyResult(True, 7)
    with sqlite3.connect(path) as raw:
        counts = [row[0] for row in raw.execute("SELECT count FROM audit ORDER BY seq")]
    assert counts == [1] * 6 + [3]  # the tally is written when the trail closes


def test_a_tallied_record_hashes_its_count_and_an_edit_is_found(path: Path) -> None:
    with AuditTrail.open(path) as trail:
        trail.append(_record(0))
        for _ in range(4):
            trail.tally(Tallied("10.9.8.7", "digits", "unauthenticated", 401))
    with sqlite3.connect(path) as raw:
        row = raw.execute("SELECT * FROM audit WHERE seq = 2").fetchone()
    assert verify_chain(path).ok
    _sql(path, "UPDATE audit SET count = 1 WHERE seq = 2")
    assert verify_chain(path).problem == "record 2: hash does not match its contents"
    assert row is not None


def test_the_tally_records_one_count_per_address_and_interval() -> None:
    tally = RefusalTally(interval_s=10.0, max_entries=2)
    a = Tallied("10.0.0.1", "digits", "unauthenticated", 401)
    b = Tallied("10.0.0.2", "digits", "rate_limited", 429)
    for now in (100.0, 101.0, 105.0):
        tally.add(a, now)
    tally.add(b, 103.0)
    tally.add(Tallied("10.0.0.3", "digits", "unauthenticated", 401), 104.0)  # past max_entries
    assert tally.due(109.9) == []
    (first,) = tally.due(110.0)
    assert (first.client, first.time, first.count, first.status) == ("10.0.0.1", 100.0, 3, 401)
    assert first.key_id is None and first.input_sha256 is None and first.answer is None
    tally.add(a, 111.0)  # a new interval, but two entries are open: counted as "other"
    rest = tally.drain()
    assert [(r.client, r.count) for r in rest] == [("10.0.0.2", 1), (OTHER_CLIENTS, 2)]
    assert tally.drain() == []


def test_tallied_records_are_written_when_their_interval_ends(path: Path) -> None:
    with AuditTrail.open(path, aggregate_s=0.2) as trail:
        for _ in range(50):
            trail.tally(Tallied("10.0.0.1", "digits", "unauthenticated", 401))
        _wait_for(lambda: trail.written == 1, timeout=5)
    (row,) = [dict(zip(("client", "count"), r, strict=True)) for r in _rows(path)]
    assert row == {"client": "10.0.0.1", "count": 50}


def _rows(path: Path) -> list[tuple[Any, ...]]:
    with sqlite3.connect(path) as raw:
        return raw.execute("SELECT client, count FROM audit ORDER BY seq").fetchall()
