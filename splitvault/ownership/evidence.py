"""``splitvault evidence``: one API key's record, for legal use, as JSON and offline HTML.

Sections: the key and its terms-of-service acceptances; its query timeline from the audit
trail with the extraction monitor's scores and flags; the audit chain's verification (a
tampered trail makes that section say FAILED, and the timeline is marked untrusted), and which
records an anchor of the private ledger covers (``--anchors``: each record carries
``anchored``; records after the last anchor, and records the public host fabricated before
an anchor, are not covered, and the section says so); the
watermark trigger records the private tier kept for the key; and, when a suspect is given,
the ownership verification against it. The HTML has no external assets and carries the
SHA-256 of the JSON it was made with.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections import Counter
from contextlib import closing
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from private_core.watermark.triggers import TriggerLogError
from shared.anchors_file import AnchorsFile
from shared.manifest import TopKPolicy
from splitvault.ownership import attribution
from splitvault.ownership.content import MISMATCH, ContentChecker
from splitvault.ownership.owner import OwnerModel
from splitvault.ownership.report_html import render_html
from splitvault.ownership.verify import Verification

if TYPE_CHECKING:
    from splitvault.ownership.sealed import SealedQueries

JSON_FILE, HTML_FILE = "evidence.json", "evidence.html"


def _state(deploy: Path) -> Path:
    from public_api.settings import public_state_dir

    state = public_state_dir(deploy)
    if not state.is_dir():
        raise FileNotFoundError(f"{state} does not exist: no public-tier state in {deploy}")
    return state


def key_section(deploy: Path, key: str, dsn: str | None = None) -> dict[str, Any]:
    """The key (by id or name) and every terms acceptance it made (``dsn``: in PostgreSQL)."""
    from public_api.keys import KEYS_DB, SqliteKeyStore
    from splitvault.state_evidence import pg_key_section

    if dsn is not None:
        return pg_key_section(dsn, key)

    path = _state(deploy) / KEYS_DB
    if not path.is_file():
        raise FileNotFoundError(f"no key store at {path}")
    with closing(SqliteKeyStore(path)) as store:
        found = store.get(key) or next((k for k in store.list() if k.name == key), None)
        if found is None:
            raise ValueError(f"no API key with id or name {key!r}")
        return {"key": asdict(found), "terms_acceptances": store.acceptances(found.key_id)}


def audit_section(
    deploy: Path,
    key_id: str,
    flag_threshold: float,
    anchors: AnchorsFile | None = None,
    per_row: int = 1,
    dsn: str | None = None,
) -> dict[str, Any]:
    """Chain verification, anchor coverage (against ``anchors``, the private ledger's export),
    the key's records, and an hourly timeline with monitor flags (``per_row``: classes
    answered per sample, the policy's k, to count samples); ``dsn``: every chain in PostgreSQL."""
    from public_api.audit import AUDIT_DB, export_records, head, verify_chain
    from public_api.audit_coverage import check_coverage

    if dsn is not None:
        return _pg_audit_section(dsn, key_id, flag_threshold, anchors, per_row)
    path = _state(deploy) / AUDIT_DB
    if not path.is_file():
        return {"status": "FAILED", "problem": f"no audit trail at {path}", "records": []}
    result = verify_chain(path)
    coverage = check_coverage(path, anchors)
    records = [
        {**record, "anchored": record["seq"] <= coverage.covered}
        for record in export_records(path, key_id)
    ]
    seq, digest = head(path)
    return {
        "status": "OK" if result.ok and coverage.ok else "FAILED",
        "problem": result.problem or (coverage.problems[0] if coverage.problems else None),
        "anchoring": {
            "verified_against_ledger": coverage.verified,
            "covered_through": coverage.covered,
            "problems": coverage.problems,
            "statement": coverage.lines(),
        },
        "first_bad_seq": result.first_bad_seq,
        "trail_records": result.records,
        "head": {"seq": seq, "hash": digest},
        **_timeline(records, flag_threshold, per_row),
    }


def _pg_audit_section(
    dsn: str, key_id: str, flag_threshold: float, anchors: AnchorsFile | None, per_row: int
) -> dict[str, Any]:
    """``audit_section`` over every replica's chain in PostgreSQL (``chains``: each one)."""
    from splitvault.state_evidence import pg_audit_records

    checked, records = pg_audit_records(dsn, key_id, anchors)
    problems = [f"chain {c['chain_id']}: {p}" for c in checked for p in c["problems"]]
    return {
        "status": "OK" if checked and not problems else "FAILED",
        "problem": problems[0] if problems else (None if checked else "no audit chain"),
        "anchoring": {
            "verified_against_ledger": anchors is not None,
            "covered_through": {c["chain_id"]: c.get("covered_through", 0) for c in checked},
            "problems": problems,
            "statement": [line for c in checked for line in c.get("statement", [])],
        },
        "first_bad_seq": next((c["first_bad_seq"] for c in checked if not c["ok"]), None),
        "trail_records": sum(c["records"] for c in checked),
        "chains": checked,
        **_timeline(records, flag_threshold, per_row),
    }


def _timeline(records: list[dict[str, Any]], flag_threshold: float, per_row: int) -> dict[str, Any]:
    flagged = [r for r in records if (r["monitor_score"] or 0.0) >= flag_threshold]
    blocked = [r for r in records if r["decision"] == "blocked"]
    return {
        "flag_threshold": flag_threshold,
        "first_flagged": flagged[0]["time"] if flagged else None,
        "first_blocked": blocked[0]["time"] if blocked else None,
        "timeline": _hourly(records, flag_threshold, per_row),
        "records": records,
    }


def _hourly(
    records: list[dict[str, Any]], flag_threshold: float, per_row: int = 1
) -> list[dict[str, Any]]:
    buckets: dict[int, dict[str, Any]] = {}
    for record in records:
        hour = int(record["time"] // 3600) * 3600
        bucket = buckets.setdefault(
            hour,
            {"hour": hour, "requests": 0, "samples": 0, "decisions": Counter(), "max_score": 0.0},
        )
        bucket["requests"] += record.get("count", 1)  # an aggregated record stands for more
        bucket["samples"] += _samples(record["answer"], per_row)
        bucket["decisions"][record["decision"]] += 1
        bucket["max_score"] = max(bucket["max_score"], record["monitor_score"] or 0.0)
    for bucket in buckets.values():
        bucket["decisions"] = dict(bucket["decisions"])
        bucket["flagged"] = bucket["max_score"] >= flag_threshold
    return [buckets[hour] for hour in sorted(buckets)]


def _samples(answer: str | None, per_row: int = 1) -> int:
    if not answer:
        return 0
    try:
        parsed = json.loads(answer)
    except ValueError:
        return 1
    if isinstance(parsed, list):  # classifications, flattened: per_row of them a sample
        return max(1, -(-len(parsed) // per_row))
    return int(parsed.get("shape", [1])[0])


def monitor_section(deploy: Path, key_id: str, dsn: str | None = None) -> dict[str, Any]:
    """The extraction monitor's latest assessment of the key (its log stays on each replica:
    with ``dsn``, a host without a public state folder has none to show)."""
    from public_api.monitor import read_assessments
    from public_api.monitor.cli import MONITOR_DB

    try:
        state = _state(deploy)
    except FileNotFoundError:
        if dsn is None:
            raise
        return {"assessment": None}
    found = read_assessments(state / MONITOR_DB, key_id)
    return {"assessment": asdict(found[0]) if found else None}


def trigger_section(
    owner: OwnerModel,
    key_id: str,
    request_ids: set[str],
    signers: dict[str, str] | None = None,
    content: ContentChecker | None = None,
) -> dict[str, Any]:
    """The watermark labels the private tier recorded as answered to this key: records with its
    key id, or without a key id but with the request id of one of its audited requests; each
    labelled by how it is attributed (``splitvault.ownership.attribution``) and, when signed,
    whether its content is verified (``splitvault.ownership.content``)."""
    kept: list[dict[str, Any]] = []
    checker = content or ContentChecker(owner.back_inputs, None)
    try:
        for record in owner.triggers():
            if record.key_id == key_id:
                linked = "key id"
            elif not record.key_id and record.request_id in request_ids:
                linked = "request id"
            else:
                continue
            item = {**asdict(record), "linked_by": linked}
            del item["inputs"]
            attributed = attribution.label(record, signers or {})
            if attributed == attribution.SIGNED:
                check = checker.check(record)
                attributed, item["content"] = check.label, check.to_json()
            kept.append({**item, "attributed": attributed})
    except (TriggerLogError, OSError) as error:
        return {"status": "FAILED", "problem": str(error), "records": kept, **_labels(kept)}
    return {"status": "OK", "problem": None, "records": kept, **_labels(kept)}


def _labels(records: list[dict[str, Any]]) -> dict[str, Any]:
    """How many records carry each attribution label, and the content mismatches."""
    counts = Counter(r["attributed"] for r in records)
    return {"attribution": dict(sorted(counts.items())), "content_mismatches": counts[MISMATCH]}


def verification_summary(results: list[tuple[str, Verification]], alpha: float) -> dict[str, Any]:
    """The verdict over every candidate set (alpha shared among them), its best result and
    each set's full result."""
    best: dict[str, Any] | None = None
    for source, verification in results:
        for result in verification.results:
            if best is None or result.p_value < best["p_value"]:
                best = {
                    "source": source,
                    "scheme": result.scheme,
                    "p_value": result.p_value,
                    "matches": result.matches,
                    "trials": result.trials,
                    "candidates": result.candidates,
                    "threshold": verification.threshold,
                }
    return {
        "claimed": any(verification.claimed for _, verification in results),
        "alpha": alpha,
        "best": best,
        "sources": [{"source": source, **v.to_json()} for source, v in results],
    }


def sealed_section(sealed: SealedQueries | None, records: list[dict[str, Any]]) -> dict[str, Any]:
    """The key's sealed queries, and how many match a served audit record (input SHA-256)."""
    if sealed is None:
        return {"opened": False}
    served = {r["input_sha256"] for r in records if r["decision"] == "served"}
    summary = sealed.summary()
    matched = sum(1 for r in summary["requests"] if r["input_sha256"] in served)
    return {"opened": True, "matched_audit": matched, **summary}


def build_evidence(
    deploy: Path,
    key: str,
    owner: OwnerModel,
    results: list[tuple[str, Verification]],
    flag_threshold: float,
    anchors: AnchorsFile | None = None,
    *,
    sealed: SealedQueries | None = None,
    alpha: float = 2.0**-64,
    dsn: str | None = None,
) -> dict[str, Any]:
    """Everything the report shows, as JSON-serialisable data (``dsn``: keys and audit trail
    in the replicas' shared PostgreSQL)."""
    keys = key_section(deploy, key, dsn)
    key_id = keys["key"]["key_id"]
    audit = audit_section(deploy, key_id, flag_threshold, anchors, _per_row(owner), dsn)
    request_ids = {r["request_id"] for r in audit["records"] if r.get("request_id")}
    signers = attribution.signer_keys(deploy)
    content = ContentChecker(owner.back_inputs, sealed)
    triggers = trigger_section(owner, key_id, request_ids, signers, content)
    return {
        "generated_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "model": owner.name,
        "watermark_key_id": owner.key.key_id,
        "api_key": keys,
        "audit": audit,
        "monitor": monitor_section(deploy, key_id, dsn),
        "triggers": triggers,
        "marked_by_hour": _marked_by_hour(triggers["records"]),
        "sealed": sealed_section(sealed, audit["records"]),
        "verification": verification_summary(results, alpha) if results else None,
        "verification_text": "\n".join(
            f"-- candidates: {source}\n{v.text()}" for source, v in results
        )
        or None,
    }


def _per_row(owner: OwnerModel) -> int:
    """Classes a top-k answer lists per sample (the policy's k, at most the classes)."""
    policy = owner.config.policy
    return min(policy.k, owner.classes) if isinstance(policy, TopKPolicy) else 1


def _marked_by_hour(records: list[dict[str, Any]]) -> list[dict[str, int]]:
    """Watermarked answers served per hour (repeats counted)."""
    hours: Counter[int] = Counter()
    for record in records:
        hours[int(record["time"] // 3600) * 3600] += int(record.get("count", 1))
    return [{"hour": hour, "marked": count} for hour, count in sorted(hours.items())]


def write_evidence(evidence: dict[str, Any], out: Path) -> tuple[Path, Path]:
    """Write ``evidence.json`` and ``evidence.html`` (which names the JSON's SHA-256)."""
    out.mkdir(parents=True, exist_ok=True)
    data = json.dumps(evidence, indent=2, sort_keys=True).encode("utf-8")
    json_path, html_path = out / JSON_FILE, out / HTML_FILE
    json_path.write_bytes(data)
    html_path.write_text(render_html(evidence, hashlib.sha256(data).hexdigest()), "utf-8")
    return json_path, html_path
