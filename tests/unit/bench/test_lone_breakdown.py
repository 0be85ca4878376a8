"""The c=1 breakdown: each request's private marks spliced into its public call, each step
named, medians over the requests whose steps match."""

from __future__ import annotations

from bench.phase_breakdown import label, lone_table, merge


def _timeline(offset: int, back_ms: int) -> list[tuple[str, int]]:
    ms = 1_000_000
    public = [
        ("public_in", 1 * ms),
        ("activations_encoded", 3 * ms),
        ("private_replied", (10 + back_ms) * ms),
        ("public_out", (11 + back_ms) * ms),
    ]
    private = [("private_in", 4 * ms), ("private_out", (9 + back_ms) * ms)]
    moved = [(n, t + offset) for n, t in public], [(n, t + offset) for n, t in private]
    return merge((offset, (12 + back_ms) * ms + offset), *moved)


def test_private_marks_go_inside_the_private_call() -> None:
    names = [name for name, _ in _timeline(0, 0)]
    assert names == [
        "client_sent",
        "public_in",
        "activations_encoded",
        "private_in",
        "private_out",
        "private_replied",
        "public_out",
        "client_received",
    ]


def test_steps_are_named_and_their_medians_taken() -> None:
    lines = lone_table([_timeline(0, 1), _timeline(10**9, 3), _timeline(2 * 10**9, 5)])
    rows = {line.split(" (`")[0].strip("| "): line for line in lines[2:]}
    assert "gRPC + mTLS out, protobuf parse" in rows
    assert "| 1.00 |" in rows["gRPC + mTLS out, protobuf parse"]
    assert "| 8.00 |" in rows["private_in -> private_out"]  # 5 + the median back time 3
    (total,) = [line for line in lines if "client-observed total" in line]
    assert "(3 of 3 requests)" in total and "**15.00**" in total


def test_compute_steps_say_their_thread_count() -> None:
    assert label("compute_start_2t", "compute_done") == "front compute + cast (2 thread(s))"
    assert label("compute_start_1t", "screened") == "monitor screen (1 thread(s))"
