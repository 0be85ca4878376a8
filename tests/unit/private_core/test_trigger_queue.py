"""Trigger records: one per (key, query) with a repeat count, retention per key, off the
request path through a bounded queue that refuses when it cannot keep up."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from structlog.testing import capture_logs

from private_core.watermark.answers import relabel_top_k
from private_core.watermark.keys import WatermarkKey
from private_core.watermark.trigger_queue import PendingRequest, TriggerQueue
from private_core.watermark.triggers import (
    TriggerLog,
    TriggerLogError,
    TriggerRecord,
    key_folder_name,
    read_triggers,
)
from shared.errors import Unavailable

KEY = WatermarkKey(bytes(range(32)))


def _record(i: int, key_id: str, time: float | None = None) -> TriggerRecord:
    return TriggerRecord(
        time=float(i) if time is None else time,
        model="clf",
        query_id=f"{i:064x}",
        label=1,
        answer=2,
        key_id=key_id,
    )


def _by_key(folder: Path) -> dict[str, list[TriggerRecord]]:
    found: dict[str, list[TriggerRecord]] = {}
    for record in read_triggers(folder, "clf", KEY):
        found.setdefault(record.key_id, []).append(record)
    return found


def test_a_repeated_query_is_one_record_with_its_count(tmp_path: Path) -> None:
    log = TriggerLog(tmp_path, "clf", KEY, max_records=1000, max_bytes=1 << 20)
    with capture_logs() as events:
        for t in range(64):
            log.append([_record(7, "k_a", time=100.0 + t)])
    log.flush_repeats()
    log.append([_record(8, "k_a")])
    (seven, eight) = sorted(_by_key(tmp_path)["k_a"], key=lambda r: r.query_id)
    assert (seven.count, seven.time, seven.last_time) == (64, 100.0, 163.0)
    assert eight.count == 1 and not seven.repeat
    repeated = [e["count"] for e in events if e["event"] == "marked_query_repeated"]
    assert repeated == [2, 4, 8, 16, 32, 64]
    reopened = TriggerLog(tmp_path, "clf", KEY, max_records=1000, max_bytes=1 << 20)
    reopened.append([_record(7, "k_a", time=500.0)])  # counted on from what the log holds
    reopened.flush_repeats()
    merged = {r.query_id: r for r in _by_key(tmp_path)["k_a"]}
    assert merged[f"{7:064x}"].count == 65 and merged[f"{7:064x}"].last_time == 500.0
    assert len(list(tmp_path.rglob("*.svtl"))) == 1  # 64 repeats took two small records


def test_one_keys_flood_never_evicts_another_keys_records(tmp_path: Path) -> None:
    log = TriggerLog(tmp_path, "clf", KEY, max_records=64, max_bytes=1 << 20)
    log.append([_record(i, "k_victim") for i in range(40)])
    for start in range(0, 5000, 100):
        log.append([_record(i, "k_flood") for i in range(start, start + 100)])
    kept = _by_key(tmp_path)
    assert [r.query_id for r in kept["k_victim"]] == [f"{i:064x}" for i in range(40)]
    assert 60 <= len(kept["k_flood"]) <= 64  # the flooder's own oldest records went
    assert kept["k_flood"][-1].query_id == f"{4999:064x}"


def test_a_segment_moved_to_another_keys_log_fails(tmp_path: Path) -> None:
    log = TriggerLog(tmp_path, "clf", KEY, max_records=1000, max_bytes=1 << 20)
    log.append([_record(1, "k_a")])
    log.append([_record(2, "k_b")])
    a, b = (tmp_path / key_folder_name(KEY, k) for k in ("k_a", "k_b"))
    assert a.is_dir() and b.is_dir() and "k_a" not in a.name
    shutil.copy(next(a.glob("*.svtl")), next(b.glob("*.svtl")))
    with pytest.raises(TriggerLogError, match="failed authentication"):
        list(read_triggers(tmp_path, "clf", KEY))


def _pending(ids: range, selected: list[bool], key_id: str = "k_a") -> PendingRequest:
    rows = len(ids)
    return PendingRequest(
        time=1.0,
        request_id="r-1",
        key_id=key_id,
        ids=[i.to_bytes(32, "big") for i in ids],
        selected=np.array(selected),
        top1=np.zeros(rows, dtype=np.int64),
        answered=np.ones(rows, dtype=np.int64),
        inputs={"act": np.arange(rows * 4, dtype=np.float16).reshape(rows, 4)},
    )


def test_the_queue_keeps_only_marked_rows_and_writes_them_off_the_request_path(
    tmp_path: Path,
) -> None:
    queue = TriggerQueue(TriggerLog(tmp_path, "clf", KEY, 1000, 1 << 20))
    queue.submit(_pending(range(4), [False, True, False, True]))
    queue.submit(_pending(range(4, 6), [False, False]))
    queue.submit(_pending(range(3, 4), [True]))  # the same query again: a repeat
    queue.close()
    records = _by_key(tmp_path)["k_a"]
    assert [int(r.query_id, 16) for r in records] == [1, 3]
    assert [r.count for r in records] == [1, 2]
    np.testing.assert_array_equal(records[0].arrays()["act"], np.arange(4, 8, dtype=np.float16))
    with pytest.raises(Unavailable, match="closed"):
        queue.submit(_pending(range(1), [True]))


def test_a_full_or_failing_queue_refuses_the_answer(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the log's folder should be")
    store = TriggerLog(blocker / "clf", "clf", KEY, 1000, 1 << 20)
    queue = TriggerQueue(store, max_rows=6, retry_interval_s=0.02)
    queue.submit(_pending(range(4), [True] * 4))
    with pytest.raises(Unavailable, match="cannot keep its watermark evidence"):
        queue.flush()
    with pytest.raises(Unavailable, match="cannot keep its watermark evidence"):
        queue.submit(_pending(range(1), [False]))
    blocker.unlink()  # storage recovers: what was queued is written, nothing dropped
    deadline = time.monotonic() + 20
    while queue.failure is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    queue.close()
    assert len(_by_key(blocker / "clf")["k_a"]) == 4
    full = TriggerQueue(TriggerLog(tmp_path / "full", "clf", KEY, 1000, 1 << 20), max_rows=6)
    full._thread = object()  # type: ignore[assignment]  # no writer: the queue only fills
    full.submit(_pending(range(4), [True] * 4))
    with pytest.raises(Unavailable, match="not keeping up"):
        full.submit(_pending(range(4, 7), [False] * 3))


def test_relabelling_computes_every_row_and_keeps_only_the_selected() -> None:
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(10), size=200)
    order = np.argsort(-p, axis=1, kind="stable")
    indices, scores = order[:, :3], np.take_along_axis(p, order, axis=1)[:, :3]
    selected = rng.random(200) < 0.3
    labels = (order[:, 0] + 1 + rng.integers(0, 9, 200)) % 10
    got_i, got_s = relabel_top_k(indices, scores, p, selected, labels)
    for row in range(200):
        if not selected[row]:
            assert (got_i[row] == indices[row]).all() and (got_s[row] == scores[row]).all()
            continue
        rest = [c for c in order[row] if c != labels[row]]
        assert got_i[row].tolist() == [labels[row], *rest][:3]
        np.testing.assert_array_equal(got_s[row], scores[row])
