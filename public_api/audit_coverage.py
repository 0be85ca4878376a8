"""Which records of an audit trail an anchor covers, checked against the private ledger.

The guarantee: after the anchor covering record n exists, no change to records 1..n by anyone
who controls the public host passes this check. A rewritten record, a record moved to another
key, a deleted record or a recomputed chain changes the hash of record n, which no longer
matches the head the private ledger recorded; a truncated trail no longer reaches n. Not
covered: records after the last anchor (the public host may still change them), and records
the public host fabricated before they were anchored (an anchor proves a record was not changed
afterwards, not that it was true).

Trusted anchors come from the private ledger's export (``--anchors``, ``shared.anchors_file``)
and from receipts kept on the public host whose signature verifies with a key that export
registers. Without an export, receipts are only checked against the records: they cannot prove
anything, since whoever controls the public host can delete them.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from public_api.audit import verify_chain
from public_api.audit_receipts import read_chain_id, read_receipts
from public_api.audit_source import TrailSource, as_source
from shared.anchor_receipt import AnchorReceipt
from shared.anchors_file import AnchorsFile


@dataclass
class Coverage:
    """The outcome: ``ok`` when nothing contradicts the anchors; records 1..``covered`` are
    covered by a verified anchor, ``covered + 1``..``records`` are not."""

    records: int
    chain_id: str | None
    verified: bool  # checked against a private ledger export
    covered: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        """What ``audit verify`` prints, problems first."""
        out = [f"FAILED: {problem}" for problem in self.problems]
        if not self.verified:
            out.append(
                "not checked against the private ledger (no --anchors): whoever controls the "
                f"public host can rewrite the trail and recompute its chain; records 1..{self.records} "
                "are NOT covered by a verified anchor"
            )
        elif self.covered:
            out.append(
                f"records 1..{self.covered} covered by an anchor of the private ledger (verified): "
                "no change to them by whoever controls the public host passes this check"
            )
        if self.verified and self.records > self.covered:
            out.append(
                f"records {self.covered + 1}..{self.records} NOT covered: written after the last "
                "anchor, they can still be changed by whoever controls the public host"
            )
        return out + self.notes


def check_coverage(
    trail: Path | TrailSource,
    anchors: AnchorsFile | None,
    chain: str | None = None,
    siblings: Collection[str] = (),
) -> Coverage:
    """Check ``trail`` (a SQLite file, or a chain in PostgreSQL) against ``anchors`` (and its own
    receipts); ``chain``: the chain id the trail must have (default: the one it holds);
    ``siblings``: other chains stored beside it (PostgreSQL's per-replica chains), whose anchors
    do not mean this trail was replaced: a chain of records not anchored yet is "not covered"."""
    path = as_source(trail)
    result = verify_chain(path)
    chain_id = read_chain_id(path)
    coverage = Coverage(result.records, chain_id, anchors is not None)
    if not result.ok:
        coverage.problems.append(str(result.problem))
    trusted = _trusted_anchors(anchors, coverage) if anchors is not None else []
    wanted = chain or chain_id
    if chain is not None and chain != chain_id:
        coverage.problems.append(f"the trail's chain id is {chain_id}, not {chain}")
    mine = [anchor for anchor in trusted if anchor.chain_id == wanted]
    others = sorted({anchor.chain_id for anchor in trusted} - {wanted})
    if anchors is not None and not mine and set(others) - set(siblings):
        coverage.problems.append(
            f"the private ledger holds no anchor of this trail's chain {chain_id}, but anchors "
            f"chain(s) {', '.join(others)}: the trail was replaced (or pass --chain)"
        )
    elif others:
        coverage.notes.append(f"the ledger also anchors other chains: {', '.join(others)}")
    hashes = _hashes(path, {a.seq for a in mine} | {seq for seq, _, _ in read_receipts(path)})
    mine += _receipts(path, wanted, hashes, anchors, coverage)
    coverage.covered = _covered(mine, hashes, coverage)
    return coverage


def _trusted_anchors(anchors: AnchorsFile, coverage: Coverage) -> list[AnchorReceipt]:
    """Every anchor of the export whose signature verifies; forks (two heads) are problems."""
    trusted: list[AnchorReceipt] = []
    for replica in anchors.replicas:
        for anchor in replica.anchors:
            key = replica.public_key(anchor.signer)
            if key is None or not anchor.verifies_with(key):
                coverage.problems.append(
                    f"anchor of record {anchor.seq} from replica {replica.replica_id}: its "
                    "signature does not verify (the anchors file was altered)"
                )
                continue
            trusted.append(anchor)
    heads: dict[tuple[str, int], str] = {}
    for anchor in trusted:
        seen = heads.setdefault((anchor.chain_id, anchor.seq), anchor.head)
        if seen != anchor.head:
            coverage.problems.append(
                f"two different heads anchored for record {anchor.seq} of chain "
                f"{anchor.chain_id}: the trail was forked"
            )
    return trusted


def _receipts(
    path: TrailSource,
    chain_id: str | None,
    hashes: dict[int, str],
    anchors: AnchorsFile | None,
    coverage: Coverage,
) -> list[AnchorReceipt]:
    """The public host's receipts: each must match the trail; those signed with a key of the
    export count as anchors."""
    keys = {}
    for replica in anchors.replicas if anchors is not None else []:
        keys.update({key: replica.public_key(key) for key in replica.keys})
    verified = []
    for seq, head, receipt in read_receipts(path):
        if isinstance(receipt, str):
            coverage.problems.append(receipt)
            continue
        if (receipt.chain_id, receipt.seq, receipt.head) != (chain_id, seq, head):
            coverage.problems.append(f"receipt of record {seq} is for another anchor")
        elif hashes.get(seq) != head:
            coverage.problems.append(f"receipt of record {seq} does not match the trail there")
        key = keys.get(receipt.signer)
        if key is not None and receipt.verifies_with(key):
            verified.append(receipt)
        elif anchors is not None:
            coverage.problems.append(
                f"receipt of record {seq}: not signed by a key of the private ledger (forged)"
            )
    return verified


def _covered(anchors: Iterable[AnchorReceipt], hashes: dict[int, str], coverage: Coverage) -> int:
    """The last record a matching anchor covers; each anchor that does not match is a problem."""
    covered = 0
    for anchor in sorted(anchors, key=lambda a: a.seq):
        actual = hashes.get(anchor.seq)
        if actual is None:
            coverage.problems.append(
                f"record {anchor.seq} was anchored by replica {anchor.replica_id} but is not in "
                f"the trail (it has {coverage.records} records): records were deleted"
            )
        elif actual != anchor.head:
            coverage.problems.append(
                f"record {anchor.seq} does not match the head replica {anchor.replica_id} "
                f"anchored: a record among 1..{anchor.seq} was changed, moved or deleted after "
                "the anchor"
            )
        else:
            covered = max(covered, anchor.seq)
    return covered if not coverage.problems else 0


def _hashes(path: TrailSource, seqs: set[int]) -> dict[int, str]:
    """The stored hash of each record in ``seqs`` that the trail has."""
    return path.hashes(seqs) if seqs else {}
