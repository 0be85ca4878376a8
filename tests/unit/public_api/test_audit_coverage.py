"""Anchor coverage of an audit trail: a real trail, a real private ledger, real rewrites."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from private_core.anchors import AnchorBook
from private_core.ledger import Ledger
from private_core.ledger_export import export_anchors
from public_api import audit_receipts
from public_api.audit import AuditRecord
from public_api.audit_coverage import check_coverage
from public_api.audit_writer import AuditTrail
from shared.anchors_file import AnchorsFile
from shared.keys import LocalFileKeyProvider
from tests.support.audit_rewrite import rewrite_trail

KEYS = ("k_0000000a", "k_0000000b")
PROVIDER = LocalFileKeyProvider.from_bytes(bytes(range(32)))


def _append(trail: AuditTrail, start: int, count: int) -> None:
    for i in range(start, start + count):
        trail.append(
            AuditRecord(
                time=1_700_000_000.0 + i,
                key_id=KEYS[i % 2],
                client="10.0.0.1",
                model="digits",
                input_sha256="ab" * 32,
                answer='{"label":7}',
                decision="served",
                status=200,
            )
        )
    trail.flush()


@pytest.fixture
def trail_path(tmp_path: Path) -> Path:
    return tmp_path / "public" / "audit.sqlite3"


@pytest.fixture
def book(tmp_path: Path) -> Iterator[AnchorBook]:
    ledger = Ledger.open(tmp_path / "private", "replica-0")
    yield AnchorBook.open(ledger, PROVIDER)
    ledger.close()


def _anchor(trail: AuditTrail, book: AnchorBook, path: Path) -> None:
    """What the anchorer does: anchor the committed head, keep the receipt beside it."""
    seq, head = trail.committed_head
    receipt = book.anchor(trail.chain_id, seq, head, seq, "splitvault-public")
    with sqlite3.connect(path) as db:
        audit_receipts.store(db, receipt)


@pytest.fixture
def anchored(trail_path: Path, book: AnchorBook, tmp_path: Path) -> AnchorsFile:
    """20 records anchored at 10 and 20, then 5 unanchored; the ledger's export."""
    with AuditTrail.open(trail_path) as trail:
        _append(trail, 0, 10)
        _anchor(trail, book, trail_path)
        _append(trail, 10, 10)
        _anchor(trail, book, trail_path)
        _append(trail, 20, 5)
    export_anchors([tmp_path / "private"]).write(tmp_path / "anchors.json")
    return AnchorsFile.read(tmp_path / "anchors.json")


def test_an_untouched_trail_is_covered_up_to_its_last_anchor(
    trail_path: Path, anchored: AnchorsFile
) -> None:
    coverage = check_coverage(trail_path, anchored)
    assert coverage.ok and coverage.verified, coverage.problems
    assert (coverage.records, coverage.covered) == (25, 20)
    text = "\n".join(coverage.lines())
    assert "records 1..20 covered by an anchor of the private ledger (verified)" in text
    assert "records 21..25 NOT covered" in text


def test_without_the_ledger_nothing_is_claimed(trail_path: Path, anchored: AnchorsFile) -> None:
    coverage = check_coverage(trail_path, None)
    assert coverage.ok and not coverage.verified and coverage.covered == 0
    assert "records 1..25 are NOT covered by a verified anchor" in "\n".join(coverage.lines())


@pytest.mark.parametrize(
    ("statements", "problem"),
    [
        # Records moved to another key, the tail deleted, the chain recomputed, receipts gone.
        (
            [
                "UPDATE audit SET key_id = 'k_0000000b' WHERE seq <= 7",
                "DELETE FROM audit WHERE seq > 22",
                "DELETE FROM audit_anchors",
            ],
            "record 10 does not match the head replica replica-0 anchored",
        ),
        (
            ["DELETE FROM audit WHERE seq > 15", "DELETE FROM audit_anchors"],
            "record 20 was anchored by replica replica-0 but is not in the trail",
        ),
        (
            ["DELETE FROM audit WHERE seq = 3", "DELETE FROM audit_anchors"],
            "record 10 does not match",
        ),
    ],
)
def test_a_rewritten_trail_fails_even_with_its_chain_recomputed(
    trail_path: Path, anchored: AnchorsFile, statements: list[str], problem: str
) -> None:
    rewrite_trail(trail_path, statements)
    assert check_coverage(trail_path, None).ok  # the plain chain check is fooled
    coverage = check_coverage(trail_path, anchored)
    assert not coverage.ok and coverage.covered == 0
    assert any(problem in p for p in coverage.problems), coverage.problems


def test_records_after_the_last_anchor_can_change_unnoticed(
    trail_path: Path, anchored: AnchorsFile
) -> None:
    rewrite_trail(trail_path, ["UPDATE audit SET key_id = 'k_0000000a' WHERE seq > 20"])
    coverage = check_coverage(trail_path, anchored)
    assert coverage.ok and coverage.covered == 20  # as the README says: not covered


def test_a_replaced_trail_and_a_forged_receipt_fail(
    trail_path: Path, anchored: AnchorsFile, tmp_path: Path
) -> None:
    with sqlite3.connect(trail_path) as db:
        db.execute("UPDATE audit_meta SET value = ? WHERE name = 'chain_id'", ("e" * 32,))
    coverage = check_coverage(trail_path, anchored)
    assert any("holds no anchor of this trail's chain" in p for p in coverage.problems)
    with sqlite3.connect(trail_path) as db:
        db.execute("UPDATE audit_meta SET value = ? WHERE name = 'chain_id'", ("f" * 32,))
    expected = f"the trail's chain id is {'f' * 32}, not {'e' * 32}"
    assert expected in check_coverage(trail_path, anchored, "e" * 32).problems
    # A receipt signed with a key the ledger never registered is a forgery.
    (replica,) = anchored.replicas
    chain = replica.anchors[0].chain_id
    with sqlite3.connect(trail_path) as db:
        db.execute("UPDATE audit_meta SET value = ? WHERE name = 'chain_id'", (chain,))
        seq, head = db.execute("SELECT seq, hash FROM audit WHERE seq = 25").fetchone()
        forged = replace(replica.anchors[0], seq=seq, head=head, record_count=seq, signer="0" * 16)
        audit_receipts.store(db, forged)
    coverage = check_coverage(trail_path, anchored)
    assert any("receipt of record 25: not signed by a key" in p for p in coverage.problems)


def test_a_sibling_chain_not_anchored_yet_is_not_covered_rather_than_replaced(
    anchored: AnchorsFile, tmp_path: Path
) -> None:
    """PostgreSQL keeps one chain per replica: a replica's records before its first anchor,
    beside chains the ledger does anchor, are not covered; they do not mean a replaced trail."""
    fresh = tmp_path / "fresh" / "audit.sqlite3"
    with AuditTrail.open(fresh) as trail:
        _append(trail, 0, 3)
    (anchored_chain,) = {a.chain_id for r in anchored.replicas for a in r.anchors}
    alone = check_coverage(fresh, anchored)
    assert any("the trail was replaced" in p for p in alone.problems)
    beside = check_coverage(fresh, anchored, siblings={anchored_chain})
    assert beside.ok and beside.covered == 0, beside.problems
    assert "records 1..3 NOT covered" in "\n".join(beside.lines())
