"""The serving comparison's own machinery: stopping the systems not being measured, and
folding rounds into one reported point."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bench.serving_comparison import median_point
from bench.serving_report import Point
from bench.serving_systems import suspended, tree_cpu_seconds

SPIN = "import time\nwhile True: sum(range(1000))"


def _state(pid: int) -> str:
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2]


def _spinning_children(pid: int) -> list[int]:
    """Children of ``pid`` that already run the spin loop. A child forked but not yet exec'd
    must not be stopped: its parent waits in vfork and could never stop itself."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    command = SPIN.encode()
    return [
        int(child)
        for child in children
        if Path(f"/proc/{child}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")[-1] == command
    ]


def _until(condition: Callable[[], bool], what: str) -> None:
    """Poll until ``condition()``; 60 s only stops a hang (it takes well under a second)."""
    deadline = time.monotonic() + 60
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_suspended_stops_a_process_tree_and_continues_it() -> None:
    child = f"import subprocess, sys; subprocess.Popen([sys.executable, '-c', {SPIN!r}]); {SPIN}"
    parent = subprocess.Popen([sys.executable, "-c", child])
    try:
        _until(lambda: len(_spinning_children(parent.pid)) == 1, "the child to start")
        tree = [parent.pid, *_spinning_children(parent.pid)]
        with suspended([parent.pid]):
            _until(lambda: all(_state(pid) == "T" for pid in tree), "both to stop")
            stopped = tree_cpu_seconds([parent.pid])
            time.sleep(0.3)  # a window in which either, had it not stopped, would spin
            assert tree_cpu_seconds([parent.pid]) - stopped < 0.02  # neither process ran
        _until(lambda: tree_cpu_seconds([parent.pid]) - stopped > 0.2, "both to spin again")
        assert all(_state(pid) in "RS" for pid in tree)
    finally:
        subprocess.run(["pkill", "-KILL", "-P", str(parent.pid)], check=False)
        parent.kill()
        parent.wait()


def _point(rps: float, p50: float, errors: dict[str, int]) -> Point:
    return Point("s", "m", 8, 1, rps, p50, p50 * 2, errors, 1.0 + rps / 100, 0.5)


def test_a_reported_point_is_the_median_of_its_rounds_with_every_error() -> None:
    point = median_point([_point(10, 5, {"503": 1}), _point(30, 9, {}), _point(20, 7, {"503": 2})])
    assert (point.throughput_rps, point.p50_ms, point.p99_ms) == (20, 7, 14)
    assert point.server_cpu_ms == 1.2 and point.errors == {"503": 3}
    two = median_point([_point(10, 5, {}), _point(30, 9, {})])
    assert (two.throughput_rps, two.p50_ms) == (20, 7)
