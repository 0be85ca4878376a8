"""``splitvault audit verify|export`` on the replicas' shared PostgreSQL database.

Every replica's chain is checked as a SQLite trail is (``audit_coverage.check_coverage``: the
hash chain, its receipts, and with ``--anchors`` the private ledger's anchors); a chain the
ledger anchors that the database no longer holds is a failure too. An export carries each
record's ``chain_id`` (seq numbers are per chain).
"""

from __future__ import annotations

import json
from typing import TextIO

from shared.anchors_file import AnchorsFile


def verify_postgres(dsn: str, anchors: AnchorsFile | None, only_chain: str | None) -> int:
    """Check every chain (or ``only_chain``); prints per chain; 1 if any fails."""
    from public_api.audit import head
    from public_api.audit_coverage import check_coverage
    from public_api.pg_audit import PgTrailSource, chains
    from splitvault.state_access import postgres

    failed = 0
    with postgres(dsn) as conn:
        present = {c for _, c in chains(conn)}
        found = [(r, c) for r, c in chains(conn) if only_chain in (None, c)]
        if only_chain is not None and not found:
            print(f"audit chain {only_chain} FAILED verification: not in the database")
            return 1
        for replica, chain_id in found:
            source = PgTrailSource(conn, chain_id, f"chain {chain_id} (replica {replica})")
            coverage = check_coverage(source, anchors, siblings=present)
            status = "OK" if coverage.ok else "FAILED verification"
            print(f"audit {source.name} {status}: {coverage.records} records")
            for line in coverage.lines():
                print(f"  {line}")
            seq, digest = head(source)
            print(f"  head: record {seq}, hash {digest}")
            failed += not coverage.ok
        missing = _anchored_elsewhere(anchors, present)
    for chain_id in [] if only_chain else missing:
        print(
            f"audit chain {chain_id} FAILED: the private ledger anchors it, the database lacks it"
        )
        failed += 1
    print(f"{len(found)} chains checked, {failed} failed")
    return 1 if failed else 0


def export_postgres(dsn: str, key_id: str, out: TextIO) -> int:
    """Write ``key_id``'s records of every chain as JSON lines; returns how many."""
    from public_api.audit import export_records
    from public_api.pg_audit import PgTrailSource, chains
    from splitvault.state_access import postgres

    count = 0
    with postgres(dsn) as conn:
        for replica, chain_id in chains(conn):
            source = PgTrailSource(conn, chain_id, replica)
            for record in export_records(source, key_id):
                line = {"chain_id": chain_id, **record}
                out.write(json.dumps(line, separators=(",", ":")) + "\n")
                count += 1
    return count


def _anchored_elsewhere(anchors: AnchorsFile | None, present: set[str]) -> list[str]:
    if anchors is None:
        return []
    anchored = {a.chain_id for replica in anchors.replicas for a in replica.anchors}
    return sorted(anchored - present)
