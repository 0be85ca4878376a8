"""Export the private ledger's audit anchors (``splitvault ledger export-anchors``).

Reads every segment in a private state folder, and in its subfolders one level down (each
replica's state folder copied there, as for the trigger log), checks each whole and writes the
anchors file (``shared.anchors_file``). A segment that does not check stops the export.
"""

from __future__ import annotations

import time
from pathlib import Path

from private_core.ledger import GENESIS, LedgerCorrupt, read_segment, segments
from shared.anchor_receipt import AnchorReceipt
from shared.anchors_file import AnchorsFile, ReplicaAnchors


def ledger_segments(state_dir: Path) -> list[Path]:
    """The segments of ``state_dir`` and of its subfolders one level down."""
    found = segments(state_dir)
    if state_dir.is_dir():
        for child in sorted(state_dir.iterdir()):
            if child.is_dir() and child.name != "ledger":
                found += segments(child)
    return found


def replica_anchors(path: Path) -> ReplicaAnchors:
    """One segment's keys and anchors; ``LedgerCorrupt`` if it does not check."""
    read = read_segment(path)
    if read.problem is not None:
        raise LedgerCorrupt(read.problem)
    keys = {
        str(r.payload["key_id"]): str(r.payload["public_key"])
        for r in read.records
        if r.kind == "signing_key"
    }
    anchors = [AnchorReceipt.from_json(r.payload) for r in read.records if r.kind == "anchor"]
    head = read.records[-1].hash if read.records else GENESIS
    return ReplicaAnchors(path.stem, keys, len(read.records), head, anchors)


def export_anchors(state_dirs: list[Path]) -> AnchorsFile:
    """The anchors of every segment under ``state_dirs``; ``FileNotFoundError`` if none."""
    paths = [path for state in state_dirs for path in ledger_segments(state)]
    if not paths:
        raise FileNotFoundError(f"no ledger segments under {', '.join(map(str, state_dirs))}")
    return AnchorsFile(time.time(), [replica_anchors(path) for path in paths])
