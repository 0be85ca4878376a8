"""``splitvault evidence`` on the replicas' shared PostgreSQL: the key and every chain's records.

Each replica's chain is verified and checked against the private ledger's anchors as a SQLite
trail is (``audit_coverage.check_coverage``, the other chains in the database as siblings); the
section is OK only if every chain is, and a chain the ledger anchors that the database lacks
fails it. Each record carries its ``chain_id`` and whether an anchor of its chain covers it.
"""

from __future__ import annotations

from contextlib import closing
from dataclasses import asdict
from typing import Any

from shared.anchors_file import AnchorsFile


def pg_key_section(dsn: str, key: str) -> dict[str, Any]:
    """The key (by id or name) in the shared database and every terms acceptance it made."""
    from public_api.key_lookup import find_in
    from public_api.pg_keys import PgKeyStore
    from public_api.pg_store import open_pool

    store = PgKeyStore(open_pool(dsn, max_size=1, timeout_s=10.0), owns_pool=True)
    with closing(store):
        found = find_in(store, key)
        return {"key": asdict(found), "terms_acceptances": store.acceptances(found.key_id)}


def pg_audit_records(
    dsn: str, key_id: str, anchors: AnchorsFile | None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(every chain's verification, the key's records of all chains by time)."""
    from public_api.audit import export_records, head, verify_chain
    from public_api.audit_coverage import check_coverage
    from public_api.pg_audit import PgTrailSource, chains
    from splitvault.audit_pg_cli import _anchored_elsewhere
    from splitvault.state_access import postgres

    checked: list[dict[str, Any]] = []
    records: list[dict[str, Any]] = []
    with postgres(dsn) as conn:
        found = chains(conn)
        present = {chain_id for _, chain_id in found}
        for replica, chain_id in found:
            source = PgTrailSource(conn, chain_id, f"chain {chain_id} (replica {replica})")
            result = verify_chain(source)
            coverage = check_coverage(source, anchors, siblings=present)
            records += [
                {**r, "chain_id": chain_id, "anchored": r["seq"] <= coverage.covered}
                for r in export_records(source, key_id)
            ]
            seq, digest = head(source)
            problems = ([result.problem] if result.problem else []) + coverage.problems
            checked.append(
                {
                    "chain_id": chain_id,
                    "replica": replica,
                    "ok": not problems,
                    "problems": problems,
                    "first_bad_seq": result.first_bad_seq,
                    "records": result.records,
                    "covered_through": coverage.covered,
                    "head": {"seq": seq, "hash": digest},
                    "statement": [f"{source.name}: {line}" for line in coverage.lines()],
                }
            )
    for chain_id in _anchored_elsewhere(anchors, present):
        problem = f"the private ledger anchors chain {chain_id}, the database lacks it"
        checked.append({"chain_id": chain_id, "ok": False, "problems": [problem], "records": 0})
    records.sort(key=lambda r: (r["time"], r["chain_id"], r["seq"]))
    return checked, records
