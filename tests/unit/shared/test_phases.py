"""Phase marks: nothing recorded or logged unless enabled; once enabled, every thread's marks
in order, logged as one event and cleared on flush."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from structlog.testing import capture_logs

from shared import phases


@pytest.fixture(autouse=True)
def fresh() -> Iterator[None]:
    saved = phases._marks
    phases._marks = None
    yield
    phases._marks = saved


def test_off_by_default_records_and_logs_nothing() -> None:
    assert not phases.enabled()
    with capture_logs() as logs:
        phases.mark("a")
        phases.flush("request_phases", tier="public")
    assert logs == []
    phases.enable()
    with capture_logs() as logs:
        phases.flush("request_phases")
    assert [log["marks"] for log in logs] == [[]]  # the mark made while off was not kept


def test_marks_from_any_thread_are_logged_in_order_and_cleared() -> None:
    phases.enable()
    phases.mark("first")
    worker = threading.Thread(target=phases.mark, args=("in_worker",))
    worker.start()
    worker.join()
    phases.mark("last")
    with capture_logs() as logs:
        phases.flush("request_phases", tier="private")
        phases.flush("request_phases", tier="private")
    first, second = logs
    assert first["tier"] == "private"
    assert [name for name, _ in first["marks"]] == ["first", "in_worker", "last"]
    times = [at for _, at in first["marks"]]
    assert times == sorted(times)
    assert second["marks"] == []
