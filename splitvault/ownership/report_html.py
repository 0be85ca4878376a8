"""The evidence report as one self-contained HTML page (inline CSS, no scripts, no links out)."""

from __future__ import annotations

import datetime as dt
import html
from collections.abc import Sequence
from typing import Any

from splitvault.ownership.report_svg import timeline_svg

_CSS = """
body{font-family:Georgia,serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#111}
h1{font-size:1.5rem}h2{font-size:1.15rem;border-bottom:1px solid #999;margin-top:2rem}
table{border-collapse:collapse;margin:.5rem 0;font-size:.9rem}
td,th{border:1px solid #bbb;padding:.2rem .5rem;text-align:left;vertical-align:top}
.ok{color:#064;font-weight:bold}.failed{color:#a00;font-weight:bold}
code,pre{font-family:monospace;font-size:.85rem}pre{white-space:pre-wrap}
.verdict{border:3px solid #333;padding:.6rem 1rem;margin:1rem 0}
.verdict h2{border:none;margin:.2rem 0;font-size:1.4rem}
.figures td:first-child{font-weight:bold;width:16rem}
"""
TIMELINE_ROWS = 500


def _e(value: Any) -> str:
    return html.escape("-" if value is None else str(value))


def _when(epoch: float | None) -> str:
    if epoch is None:
        return "-"
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _status(status: str) -> str:
    css = "ok" if status == "OK" else "failed"
    return f'<span class="{css}">{_e(status)}</span>'


def _key(section: dict[str, Any]) -> str:
    key = section["key"]
    rows = [
        ("key id", key["key_id"]),
        ("name", key["name"]),
        ("created", _when(key["created_at"])),
        ("revoked", _when(key["revoked_at"])),
    ]
    accepted = [
        (a["version"], a["terms_sha256"], a["client_address"], _when(a["accepted_at"]))
        for a in section["terms_acceptances"]
    ]
    terms = (
        _table(("terms version", "terms SHA-256", "client address", "accepted at"), accepted)
        if accepted
        else "<p>This key never accepted the terms of service.</p>"
    )
    return "<h2>1. API key and terms of service</h2>" + _table(("", ""), rows) + terms


def _audit(section: dict[str, Any]) -> str:
    parts = [f"<h2>2. Audit trail verification: {_status(section['status'])}</h2>"]
    if section["status"] != "OK":
        parts.append(
            f"<p class='failed'>The hash chain FAILED verification: {_e(section['problem'])}. "
            "The timeline below comes from a trail that was altered and is not evidence.</p>"
        )
    elif "chains" in section:  # PostgreSQL: one chain per replica
        heads = "".join(
            f"<li>chain {_e(c['chain_id'])} (replica {_e(c['replica'])}): {_e(c['records'])} "
            f"records, head record {_e(c['head']['seq'])}, hash <code>{_e(c['head']['hash'])}"
            "</code></li>"
            for c in section["chains"]
        )
        parts.append(
            f"<p>{_e(section['trail_records'])} records, chains intact:</p><ul>{heads}</ul>"
        )
    else:
        head = section["head"]
        parts.append(
            f"<p>{_e(section['trail_records'])} records, chain intact. Head: record "
            f"{_e(head['seq'])}, hash <code>{_e(head['hash'])}</code> (compare with an anchored "
            "copy).</p>"
        )
    anchoring = section.get("anchoring")
    if anchoring:
        items = "".join(f"<li>{_e(line)}</li>" for line in anchoring["statement"])
        parts.append(f"<p>Anchoring in the private ledger:</p><ul>{items}</ul>")
    return "".join(parts)


def _timeline(section: dict[str, Any], monitor: dict[str, Any]) -> str:
    records = section.get("records", [])
    rows = [
        (
            _when(b["hour"]),
            b["requests"],
            b["samples"],
            ", ".join(f"{k}: {v}" for k, v in sorted(b["decisions"].items())),
            f"{b['max_score']:.2f}",
            "FLAGGED" if b["flagged"] else "",
        )
        for b in section.get("timeline", [])[:TIMELINE_ROWS]
    ]
    assessment = monitor.get("assessment")
    latest = (
        "<p>No monitor assessment for this key.</p>"
        if assessment is None
        else f"<p>Latest monitor assessment: level <b>{_e(assessment['level'])}</b>, score "
        f"{assessment['score']:.2f} after {_e(assessment['queries'])} queries "
        f"({_when(assessment['updated_at'])}); reasons: {_e('; '.join(assessment['reasons']))}.</p>"
    )
    first = records[0]["time"] if records else None
    last = records[-1]["time"] if records else None
    return (
        "<h2>3. Query timeline and extraction monitor</h2>"
        f"<p>{len(records)} requests from {_when(first)} to {_when(last)}; first flagged "
        f"(score &ge; {section.get('flag_threshold', '-')}) {_when(section.get('first_flagged'))}, "
        f"first blocked {_when(section.get('first_blocked'))}. Hourly:</p>"
        + _table(("hour", "requests", "samples", "decisions", "max score", "flag"), rows)
        + latest
    )


def _triggers(section: dict[str, Any]) -> str:
    records = section["records"]
    rows = [
        (
            _when(r["time"]),
            r["request_id"],
            r["linked_by"],
            r.get("attributed", "public"),
            (r.get("content") or {}).get("reason", "-"),
            r["query_id"][:16],
            r["label"],
            r["answer"],
        )
        for r in records[:TIMELINE_ROWS]
    ]
    status = "" if section["status"] == "OK" else f" {_status(section['status'])}"
    problem = f"<p class='failed'>{_e(section['problem'])}</p>" if section["problem"] else ""
    return (
        f"<h2>4. Watermarked answers served to this key{status}</h2>{problem}"
        f"<p>{len(records)} answers carried a watermark label (kept encrypted in the private "
        f"tier). {_CONTENT}</p>"
        + _table(
            (
                "time",
                "request id",
                "linked by",
                "attributed",
                "content",
                "query id",
                "model's class",
                "class answered",
            ),
            rows,
        )
    )


def _verification(evidence: dict[str, Any]) -> str:
    text = evidence.get("verification_text")
    if text is None:
        return "<h2>5. Ownership verification</h2><p>No suspect was given.</p>"
    verdict = "CLAIMED" if evidence["verification"]["claimed"] else "NOT CLAIMED"
    css = "ok" if verdict == "CLAIMED" else "failed"
    return (
        f'<h2>5. Ownership verification: <span class="{css}">{verdict}</span></h2>'
        f"<pre>{_e(text)}</pre>"
    )


def _p(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def _verdict_line(verification: dict[str, Any] | None) -> tuple[str, str, str]:
    """(heading, css class, one-sentence reading) of the verdict."""
    if verification is None:
        return "NO SUSPECT TESTED", "failed", "No suspect model was tested for this report."
    best = verification.get("best") or {}
    sources = len(verification["sources"])
    if verification["claimed"]:
        return (
            "OWNERSHIP CLAIMED",
            "ok",
            f"The suspect model reproduces this model's secret watermark far beyond chance: "
            f"p-value {_p(best.get('p_value'))}, below the threshold "
            f"{_p(best.get('threshold'))} (alpha {_p(verification['alpha'])} shared among "
            f"{sources} candidate set(s) and the tests run).",
        )
    return (
        "OWNERSHIP NOT CLAIMED",
        "failed",
        f"The best p-value, {_p(best.get('p_value'))}, is not below the threshold "
        f"{_p(best.get('threshold'))}: this report does not show the suspect was copied.",
    )


def _served(records: list[dict[str, Any]]) -> tuple[int, int]:
    served = [b for b in records if b["decisions"].get("served")]
    return sum(b["decisions"]["served"] for b in served), sum(b["samples"] for b in records)


def _figures(evidence: dict[str, Any]) -> list[tuple[str, str]]:
    audit, triggers = evidence["audit"], evidence["triggers"]
    verification = evidence.get("verification") or {}
    best = verification.get("best") or {}
    records = audit.get("records", [])
    requests, samples = _served(audit.get("timeline", []))
    marked = triggers["records"]
    accepted = evidence["api_key"]["terms_acceptances"]
    rows = [
        (
            "p-value",
            f"{_p(best.get('p_value'))} ({best.get('scheme', '-')} test, candidates: "
            f"{best.get('source', '-')})",
        ),
        (
            "marks reproduced",
            f"{best.get('matches', '-')} of {best.get('trials', '-')} "
            f"watermarked queries ({best.get('candidates', '-')} distinct candidates)",
        ),
        (
            "budget",
            f"{requests:,} requests served, {samples:,} samples answered; "
            f"{len(marked):,} distinct queries answered with a watermark label "
            f"({sum(r.get('count', 1) for r in marked):,} times)",
        ),
        ("key created", _when(evidence["api_key"]["key"]["created_at"])),
        ("terms accepted", _when(accepted[0]["accepted_at"]) if accepted else "never"),
        (
            "first / last request",
            f"{_when(records[0]['time'] if records else None)} / "
            f"{_when(records[-1]['time'] if records else None)}",
        ),
        (
            "first flagged / blocked",
            f"{_when(audit.get('first_flagged'))} / {_when(audit.get('first_blocked'))}",
        ),
        ("audit trail / trigger log", f"{audit['status']} / {triggers['status']}"),
        (
            "watermarked answers attributed",
            "; ".join(f"{n:,} {label}" for label, n in triggers.get("attribution", {}).items())
            or "none",
        ),
    ]
    sealed = evidence.get("sealed") or {}
    if sealed.get("opened"):
        rows.append(
            (
                "sealed queries",
                f"{sealed['bodies']:,} bodies opened ({sealed['rows']:,} "
                f"rows), {sealed['matched_audit']:,} match a served audit record; "
                f"{len(sealed['problems'])} did not open",
            )
        )
    return rows


_ATTRIBUTION = (
    "<ul><li><b>Requests</b> (audit trail): the public tier records the API key it "
    "authenticated from the request's bearer token, the client address, the SHA-256 of the "
    "input and the answer, in a hash chain verified above.</li>"
    "<li><b>Watermarked answers</b> (trigger log): the private tier keeps, encrypted, each "
    "query it answered with a watermark label, under the API key id the public tier sent with "
    "the call (linked by key id) or, without one, the request id of an audited request "
    "(linked by request id); a query asked again is one record with its repeat count.</li>"
    "<li><b>Sealed queries</b>: the exact body of each served request, sealed by the public "
    "tier to the owner's public key under the authenticated API key, opened offline with the "
    "owner's private key; each body's SHA-256 is kept with it (its RFC 9530 Content-Digest "
    "matches a client's signed request) and its input digest matches the audit record of the "
    "same request.</li></ul>"
)


_CONTENT = (
    "Attributed: <b>signed and content-verified</b>: the customer's request signature verifies "
    "again here, the sealed body carrying it has exactly the digest the customer signed, and the "
    "public front run here on that body gives the activations the private tier answered; "
    "<b>signed only</b>: the signature verifies but the content was not checked (no owner key, "
    "or no sealed body); <b>content mismatch</b>: a genuine signature, but the sealed body or "
    "the activations answered are not what the customer signed (the public host substituted "
    "content); <b>attributed by the public tier alone</b>: unsigned (bearer keys, stock "
    "clients), a host that controls the public tier could have sent the key id."
)


def _mismatch(triggers: dict[str, Any]) -> str:
    """A loud warning when signed answers were computed from content the customer did not sign."""
    count = int(triggers.get("content_mismatches", 0))
    if not count:
        return ""
    return (
        f'<p class="failed">CONTENT MISMATCH: {count:,} watermarked answers under a genuine '
        "customer signature were not computed from the body the customer signed. The public "
        "host substituted content; those records do not show what the customer asked.</p>"
    )


def _verdict(evidence: dict[str, Any]) -> str:
    heading, css, reading = _verdict_line(evidence.get("verification"))
    figures = "".join(
        f"<tr><td>{_e(name)}</td><td>{_e(value)}</td></tr>" for name, value in _figures(evidence)
    )
    chart = timeline_svg(
        evidence["audit"].get("timeline", []),
        evidence.get("marked_by_hour", []),
        float(evidence["audit"].get("flag_threshold", 0.5)),
    )
    return (
        f'<div class="verdict"><h2>Verdict: <span class="{css}">{heading}</span></h2>'
        f"<p>{_e(reading)}</p></div>{_mismatch(evidence['triggers'])}"
        f'<table class="figures">{figures}</table>'
        f"<h2>How each record is attributed</h2>{_ATTRIBUTION}"
        f"<h2>Timeline</h2>{chart}"
    )


def render_html(evidence: dict[str, Any], json_sha256: str) -> str:
    """The whole report."""
    title = f"Evidence: API key {evidence['api_key']['key']['key_id']}, model {evidence['model']}"
    body = "".join(
        (
            f"<h1>{_e(title)}</h1>",
            _verdict(evidence),
            f"<p>Generated {_e(evidence['generated_at'])}. Watermark key id "
            f"<code>{_e(evidence['watermark_key_id'])}</code>. Data: <code>evidence.json</code>, "
            f"SHA-256 <code>{_e(json_sha256)}</code>.</p>",
            _key(evidence["api_key"]),
            _audit(evidence["audit"]),
            _timeline(evidence["audit"], evidence["monitor"]),
            _triggers(evidence["triggers"]),
            _verification(evidence),
        )
    )
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
        f"<style>{_CSS}</style></head><body>{body}</body></html>\n"
    )
