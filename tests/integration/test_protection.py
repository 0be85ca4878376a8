"""The abuse protections through real processes: keys, terms, limits, audit, metrics, monitor.

One module-scoped copy of the session deployment (without MiniLM, to save CPU) runs its own
private tier and a public tier with tight limits (2 samples/s, burst 5, 1000 a day per key;
limits count samples, the rows of a request's batch). A second public tier on the same state
folder serves terms version 2 with the monitor set to block.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import re
import sqlite3
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from splitvault_client import Client, Forbidden

from public_api.audit import AUDIT_DB, input_digest
from public_api.keys import KEYS_DB, STATE_DIR, SqliteKeyStore, parse_key_id
from public_api.monitor import read_assessments
from public_api.monitor.cli import add_monitor_commands, monitor_log_path
from shared.layout import DeployLayout
from tests.conftest import Deployment, DigitsFixture, issue_key
from tests.support.deployments import copy_deployment
from tests.support.processes import TierProcess, start_private, start_public, wait_for
from tests.support.stack import image_request, tier_env

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]
# One unit per 100 s: no stall of a loaded machine refills a unit between a test's requests,
# so a test that exhausts a burst sees exactly the burst admitted, however slow it runs.
SLOW_RATE = 0.01
# Tight key limits (digits-label has its own defaults; a key's overrides still win over them).
PUBLIC_ENV = tier_env(
    key_limits__rate_per_s=2,
    key_limits__burst=5,
    key_limits__daily_quota=1000,
    model_limits={"digits-label": {"rate_per_s": SLOW_RATE, "burst": 2, "daily_quota": 500}},
    audit_aggregate_s=0.5,
)
# The "restarted" tier: terms version 2, a monitor that blocks, limits out of the way.
PUBLIC_V2_ENV = tier_env(terms_version=2, monitor_action="block")
LINK = '</v1/terms>; rel="terms-of-service"'
INFER = "/v2/models/{}/infer"
# Keys issued before the tiers start: name -> limit overrides. A test that uses up a key's
# limits issues its own key (``_fresh_key``), so that it can run in any order, and again.
KEYS: dict[str, dict[str, Any]] = {
    "links": {},
    "terms-v2": {},
    "unaccepted": {"accept_terms": False},
    "sdk": {"accept_terms": False},
    "extractor": {"accept_terms": False, "rate_per_s": 100000, "burst": 100000},
}


@dataclass
class Stack:
    """The module's deployment copy, its tiers and the keys issued in it."""

    layout: DeployLayout
    private: TierProcess
    public: TierProcess
    keys: dict[str, str]

    def url(self, tier: TierProcess | None = None) -> str:
        return f"https://localhost:{(tier or self.public).port}"

    def http(
        self, key: str | None = None, tier: TierProcess | None = None, source: str | None = None
    ) -> httpx.Client:
        """An HTTPS client trusting the copy's CA, sending ``key`` as a bearer token (from the
        loopback address ``source``, when given)."""
        context = ssl.create_default_context(cafile=str(self.layout.public.ca_cert))
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        transport = httpx.HTTPTransport(verify=context, local_address=source)
        return httpx.Client(
            base_url=self.url(tier), transport=transport, headers=headers, timeout=30
        )

    def private_metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """The private tier's samples, from the metrics port it logged at startup."""
        (port,) = [
            e["metrics_port"]
            for e in self.private.events()
            if e.get("event") == "private_tier_listening"
        ]
        return _samples(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``python -m splitvault ARGS`` (``--deploy`` is added after the subcommand)."""
        command = [sys.executable, "-m", "splitvault", *args, "--deploy", str(self.layout.root)]
        return subprocess.run(
            command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=False
        )

    @property
    def state(self) -> Path:
        return self.layout.public.root / STATE_DIR


@pytest.fixture(scope="module")
def stack(deployment: Deployment, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    destination = tmp_path_factory.mktemp("protection") / "d"
    layout = copy_deployment(deployment.layout, destination, keep_public_state=False)
    keys = {name: issue_key(layout, name, **options) for name, options in KEYS.items()}
    private = start_private(layout.root, env=tier_env())
    try:
        public = start_public(layout.root, private.port, env=PUBLIC_ENV)
        try:
            yield Stack(layout, private, public, keys)
        finally:
            public.stop()
    finally:
        private.stop()


@pytest.fixture(scope="module")
def public_v2(stack: Stack) -> Iterator[TierProcess]:
    """The public tier restarted with terms version 2 (and a blocking monitor)."""
    tier = start_public(stack.layout.root, stack.private.port, env=PUBLIC_V2_ENV)
    yield tier
    tier.stop()


def _body(x: np.ndarray) -> dict[str, Any]:
    return image_request(x)


def _images(digits: DigitsFixture, n: int = 1, start: int = 0) -> np.ndarray:
    return np.ascontiguousarray(digits.data.test_x[start : start + n], dtype=np.float32)


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus exposition, by name and sorted labels."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _value(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


_MEMBER = re.compile(r'"(?P<name>[a-z]+)"(?P<params>(?:;[a-z]+=\d+)*)')


def _sf_list(value: str) -> dict[str, dict[str, int]]:
    """A Structured Field list like ``"burst";q=5;w=3, "daily";q=9`` as name -> parameters."""
    members: dict[str, dict[str, int]] = {}
    for member in value.split(","):
        match = _MEMBER.fullmatch(member.strip())
        assert match is not None, f"unparseable structured field member {member!r} in {value!r}"
        pairs = (param.split("=") for param in match["params"].split(";")[1:])
        members[match["name"]] = {name: int(number) for name, number in pairs}
    return members


def _fresh_key(stack: Stack, purpose: str, **limits: Any) -> str:
    """A new key with accepted terms, issued while the tiers run (they see it at once)."""
    return issue_key(stack.layout, f"{purpose}-{uuid.uuid4().hex[:8]}", **limits)


def _key_id(secret: str) -> str:
    key_id = parse_key_id(secret)
    assert key_id is not None
    return key_id


def _poll(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    wait_for(condition, timeout=timeout, what=what)


def _assert_error(reply: httpx.Response, status: int, *fragments: str) -> str:
    """A JSON ``{"error": ...}`` with ``status``, mentioning ``fragments``, with the Link header."""
    assert reply.status_code == status, reply.text
    assert reply.headers["link"] == LINK
    payload = reply.json()
    assert list(payload) == ["error"]
    message: str = payload["error"]
    for fragment in fragments:
        assert fragment in message, message
    return message


# --- API keys -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("authorization", "fragment"),
    [
        (None, "missing API key"),
        ("Basic dXNlcjpwYXNz", "missing API key"),
        ("Bearer", "missing API key"),
        ("Bearer sv_k_00000000_" + "A" * 43, "invalid API key"),  # well formed, unknown
        ("Bearer not-a-splitvault-key", "invalid API key"),
    ],
)
def test_bad_credentials_are_401(
    stack: Stack, digits_model: DigitsFixture, authorization: str | None, fragment: str
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    with stack.http() as http:
        reply = http.post(
            INFER.format("digits"), json=_body(_images(digits_model)), headers=headers
        )
        _assert_error(reply, 401, fragment)
        _assert_error(http.get("/v2/models/digits", headers=headers), 401)


def test_revoked_key_is_refused_within_the_cache_lifetime(
    stack: Stack, digits_model: DigitsFixture
) -> None:
    name = f"revoke-{uuid.uuid4().hex[:8]}"
    secret, body = issue_key(stack.layout, name), _body(_images(digits_model))
    with stack.http(secret) as http:
        assert http.post(INFER.format("digits"), json=body).status_code == 200  # now cached
        revoked = stack.cli("keys", "revoke", name)
        assert revoked.returncode == 0, revoked.stderr
        assert _key_id(secret) in revoked.stdout
        replies: list[httpx.Response] = []

        def refused() -> bool:  # metadata: authenticated like inference, no limit, no compute
            replies.append(http.get("/v2/models/digits"))
            return replies[-1].status_code != 200

        # The auth cache keeps a key for 5 s (test_key_cache shows the exact lifetime on a fake
        # clock); 30 s, six times that, only stops a hang on a loaded machine.
        _poll(refused, "the revocation to reach the running tier", timeout=30)
        _assert_error(replies[-1], 401, "revoked", _key_id(secret))
        _assert_error(http.post(INFER.format("digits"), json=body), 401, "revoked")


def test_key_created_while_the_tier_runs_works_at_once(
    stack: Stack, digits_model: DigitsFixture
) -> None:
    created = stack.cli("keys", "create", "--name", "live")
    assert created.returncode == 0, created.stderr
    (secret,) = re.findall(r"sv_k_[0-9a-f]{8}_[A-Za-z0-9_-]{43}", created.stdout)
    with stack.http(secret) as http:
        _assert_error(http.post(INFER.format("digits"), json=_body(_images(digits_model))), 403)
        assert http.post("/v1/terms/accept", json={"version": "1"}).status_code == 200
        reply = http.post(INFER.format("digits"), json=_body(_images(digits_model)))
    assert reply.status_code == 200, reply.text


# --- terms of service ---------------------------------------------------------------------


def test_terms_must_be_accepted_before_inference(stack: Stack, digits_model: DigitsFixture) -> None:
    secret = stack.keys["unaccepted"]
    terms_file = stack.layout.public.root / "terms.md"
    with stack.http(secret) as http:
        terms = http.get("/v1/terms")
        assert terms.status_code == 200 and terms.headers["link"] == LINK
        assert terms.json() == {
            "version": "1",
            "text": terms_file.read_text(encoding="utf-8"),
            "sha256": hashlib.sha256(terms_file.read_bytes()).hexdigest(),
        }
        body = _body(_images(digits_model))
        _assert_error(http.post(INFER.format("digits"), json=body), 403, "/v1/terms")
        _assert_error(http.post("/v1/terms/accept", json={"version": "0"}), 403, "'1'")
        with stack.http() as anonymous:
            _assert_error(anonymous.post("/v1/terms/accept", json={"version": "1"}), 401)
        _assert_error(http.post(INFER.format("digits"), json=body), 403, "/v1/terms")
        accepted = http.post("/v1/terms/accept", json={"version": "1"})
        assert accepted.status_code == 200, accepted.text
        assert accepted.json() == {"accepted": True, "version": "1"}
        assert http.post(INFER.format("digits"), json=body).status_code == 200
    store = SqliteKeyStore(stack.state / KEYS_DB)
    try:
        (record,) = store.acceptances(_key_id(secret))
    finally:
        store.close()
    assert record["version"] == "1" and record["client_address"] == "127.0.0.1"
    assert record["terms_sha256"] == terms.json()["sha256"]
    assert abs(record["accepted_at"] - time.time()) < 60


def test_new_terms_version_must_be_accepted_again(
    stack: Stack, public_v2: TierProcess, digits_model: DigitsFixture
) -> None:
    secret, body = stack.keys["terms-v2"], _body(_images(digits_model))
    with stack.http(secret) as v1:
        assert v1.post(INFER.format("digits"), json=body).status_code == 200
    with stack.http(secret, tier=public_v2) as v2:
        assert v2.get("/v1/terms").json()["version"] == "2"
        _assert_error(v2.post(INFER.format("digits"), json=body), 403, "version 2", "/v1/terms")
        _assert_error(v2.post("/v1/terms/accept", json={"version": "1"}), 403)
        assert v2.post("/v1/terms/accept", json={"version": "2"}).status_code == 200
        assert v2.post(INFER.format("digits"), json=body).status_code == 200
    store = SqliteKeyStore(stack.state / KEYS_DB)
    try:
        versions = [a["version"] for a in store.acceptances(_key_id(secret))]
    finally:
        store.close()
    assert versions == ["1", "2"]


def test_sdk_reads_and_accepts_the_terms(stack: Stack, digits_model: DigitsFixture) -> None:
    terms_file = stack.layout.public.root / "terms.md"
    with Client(stack.url(), api_key=stack.keys["sdk"], ca=stack.layout.public.ca_cert) as client:
        terms = client.terms()
        assert terms.version == "1"
        assert terms.sha256 == hashlib.sha256(terms_file.read_bytes()).hexdigest()
        with pytest.raises(Forbidden, match="/v1/terms"):
            client.predict("digits", _images(digits_model))
        acceptance = client.accept_terms(terms.version)
        assert acceptance.accepted and acceptance.version == "1"
        prediction = client.predict("digits", _images(digits_model, 2))
    assert prediction.indices is not None and prediction.indices.shape == (2, 3)


def test_every_response_links_the_terms(stack: Stack, digits_model: DigitsFixture) -> None:
    with stack.http(stack.keys["links"]) as http:
        replies = [
            http.get("/v2/health/live"),
            http.get("/v1/terms"),
            http.get("/metrics"),  # served on the internal metrics listener only
            http.get("/no/such/path"),
            http.get("/v2/models/digits"),
            http.post(INFER.format("no-such-model"), json=_body(_images(digits_model))),
            http.post(INFER.format("digits"), content=b"{not json"),
        ]
    with stack.http() as anonymous:
        replies.append(anonymous.get("/v2/models/digits"))
    assert [r.status_code for r in replies] == [200, 200, 404, 404, 200, 404, 400, 401]
    assert all(r.headers.get("link") == LINK for r in replies), [r.headers for r in replies]


# --- rate limits and quotas ---------------------------------------------------------------


def test_burst_then_429_with_headers(stack: Stack, digits_model: DigitsFixture) -> None:
    """Five admitted at once, the sixth refused: at 0.01/s no unit refills in between (at the
    tier's 2/s a 0.5 s stall of the machine refilled one and the sixth got 200)."""
    secret, body = (
        _fresh_key(stack, "burst", rate_per_s=SLOW_RATE, burst=5),
        _body(_images(digits_model)),
    )
    with stack.http(secret) as http:
        started = time.monotonic()
        replies = [http.post(INFER.format("digits"), json=body) for _ in range(6)]
        took = time.monotonic() - started  # bounds the tier's own time between them
    assert [r.status_code for r in replies] == [200] * 5 + [429]
    for used, reply in enumerate(replies[:5], start=1):
        assert "retry-after" not in reply.headers
        assert _sf_list(reply.headers["ratelimit-policy"]) == {
            "burst": {"q": 5, "w": 500},  # 5 units at 0.01/s
            "daily": {"q": 1000, "w": 86400},
        }
        state = _sf_list(reply.headers["ratelimit"])
        assert state["burst"]["r"] == 5 - used and 0 < state["burst"]["t"] <= 100 * used
    refused = replies[5]
    _assert_error(refused, 429, "rate limit", "API key")
    # One unit refills 100 s after the first request was admitted, whatever the machine's speed.
    assert 100 - took <= int(refused.headers["retry-after"]) <= 100
    assert _sf_list(refused.headers["ratelimit"])["burst"]["r"] == 0
    assert "burst" in _sf_list(refused.headers["ratelimit-policy"])


def test_admitted_again_after_retry_after(stack: Stack, digits_model: DigitsFixture) -> None:
    """At the tier's default 2/s a refusal says "retry after 1 s", and a retry then succeeds."""
    body = _body(_images(digits_model))
    with stack.http(_fresh_key(stack, "retry")) as http:
        replies: list[httpx.Response] = []
        # Until refused: the burst of 5 goes in a few requests unless each took 0.5 s.
        while len(replies) < 50 and (not replies or replies[-1].status_code == 200):
            replies.append(http.post(INFER.format("digits"), json=body))
        refused = replies[-1]
        _assert_error(refused, 429, "rate limit", "API key")
        for reply in replies:
            assert _sf_list(reply.headers["ratelimit-policy"]) == {
                "burst": {"q": 5, "w": 3},
                "daily": {"q": 1000, "w": 86400},
            }
        retry_after = int(refused.headers["retry-after"])
        assert retry_after == 1  # at most 0.5 s until one unit refills, rounded up
        time.sleep(retry_after)  # the client honours Retry-After: that is the behaviour tested
        assert http.post(INFER.format("digits"), json=body).status_code == 200


def test_rejected_requests_compute_nothing(stack: Stack, digits_model: DigitsFixture) -> None:
    body = _body(_images(digits_model, 4))
    served = ("splitvault_private_requests_total", {"model": "digits", "code": "OK"})
    rows = ("splitvault_private_batch_size_sum", {"model": "digits"})
    with stack.http(_fresh_key(stack, "rejected", rate_per_s=SLOW_RATE, burst=4)) as http:
        assert (
            http.post(INFER.format("digits"), json=body).status_code == 200
        )  # the burst: 4 samples
        before = stack.private_metrics()
        statuses = [http.post(INFER.format("digits"), json=body).status_code for _ in range(3)]
        after = stack.private_metrics()
    assert statuses == [429] * 3
    assert _value(after, served[0], **served[1]) == _value(before, served[0], **served[1]) > 0
    assert _value(after, rows[0], **rows[1]) == _value(before, rows[0], **rows[1])


def test_daily_quota(stack: Stack, digits_model: DigitsFixture) -> None:
    body = _body(_images(digits_model))
    quota = _fresh_key(stack, "quota", daily_quota=3, rate_per_s=100, burst=100)
    with stack.http(quota) as http:
        replies = [http.post(INFER.format("digits"), json=body) for _ in range(4)]
    assert [r.status_code for r in replies] == [200, 200, 200, 429]
    assert _sf_list(replies[0].headers["ratelimit-policy"]) == {
        "burst": {"q": 100, "w": 1},
        "daily": {"q": 3, "w": 86400},
    }
    assert _sf_list(replies[2].headers["ratelimit"])["daily"]["r"] == 0
    refused = replies[3]
    _assert_error(refused, 429, "daily quota")
    seconds_to_midnight = 86400 - time.time() % 86400
    # Hours away, give or take the request's own time: a minute of slack hides no error.
    assert abs(int(refused.headers["retry-after"]) - seconds_to_midnight) < 60
    state = _sf_list(refused.headers["ratelimit"])
    assert list(state) == ["daily"] and state["daily"]["r"] == 0
    assert abs(state["daily"]["t"] - seconds_to_midnight) < 60


def test_key_overrides_win_over_model_defaults(stack: Stack, digits_model: DigitsFixture) -> None:
    """digits-label allows burst 2 by default; the "label-override" key has burst 4."""
    body = _body(_images(digits_model))
    admitted: dict[str, list[int]] = {}
    keys = {
        "label-default": (_fresh_key(stack, "label-default"), 2),
        "label-override": (_fresh_key(stack, "label-override", rate_per_s=SLOW_RATE, burst=4), 4),
    }
    for name, (secret, burst) in keys.items():
        with stack.http(secret) as http:
            replies = [http.post(INFER.format("digits-label"), json=body) for _ in range(burst + 1)]
        admitted[name] = [r.status_code for r in replies]
        policy = _sf_list(replies[0].headers["ratelimit-policy"])
        assert policy["burst"]["q"] == burst
        assert policy["daily"]["q"] == 500  # the model's, not the key-limits default (1000)
    assert admitted == {"label-default": [200, 200, 429], "label-override": [200] * 4 + [429]}


# --- audit trail --------------------------------------------------------------------------


def _export(stack: Stack, key_id: str) -> list[dict[str, Any]]:
    result = stack.cli("audit", "export", "--key", key_id)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def _tampered_copy(stack: Stack, destination: Path, seq: int) -> DeployLayout:
    """A deployment folder holding a consistent copy of the live trail, one decision edited."""
    layout = DeployLayout(destination)
    target = layout.public.root / STATE_DIR / AUDIT_DB
    target.parent.mkdir(parents=True)
    with (
        contextlib.closing(sqlite3.connect(stack.state / AUDIT_DB)) as live,
        contextlib.closing(sqlite3.connect(target)) as copy,
    ):
        live.backup(copy)
        with copy:
            copy.execute("UPDATE audit SET decision = 'rate_limited' WHERE seq = ?", (seq,))
    return layout


def test_audit_trail_records_every_decision(
    stack: Stack, digits_model: DigitsFixture, tmp_path: Path
) -> None:
    secret = _fresh_key(stack, "audit", rate_per_s=SLOW_RATE, burst=15)  # 5 x 3 samples
    key_id = _key_id(secret)
    x = _images(digits_model, 3, start=20)
    with stack.http(secret) as http:
        served = [http.post(INFER.format("digits"), json=_body(x)) for _ in range(5)]
        refused = http.post(INFER.format("digits"), json=_body(x))
    assert [r.status_code for r in served] == [200] * 5 and refused.status_code == 429

    records: list[dict[str, Any]] = []

    def written() -> bool:
        records[:] = _export(stack, key_id)
        return len(records) >= 6

    _poll(written, "the audit records of the key")
    assert [r["decision"] for r in records] == ["served"] * 5 + ["rate_limited"]
    assert [r["status"] for r in records] == [200] * 5 + [429]
    assert {r["client"] for r in records} == {"127.0.0.1"}
    assert {r["model"] for r in records} == {"digits"}
    assert [r["seq"] for r in records] == sorted(r["seq"] for r in records)
    digest = input_digest({"image": x})
    for record, reply in zip(records, served, strict=False):
        assert record["input_sha256"] == digest
        assert json.loads(record["answer"]) == reply.json()["outputs"][0]["data"]
        assert record["monitor_score"] is not None
    assert records[5]["input_sha256"] is None and records[5]["answer"] is None

    verified = stack.cli("audit", "verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "OK" in verified.stdout

    bad_seq = records[2]["seq"]
    tampered = _tampered_copy(stack, tmp_path / "tampered", bad_seq)
    result = subprocess.run(
        [sys.executable, "-m", "splitvault", "audit", "verify", "--deploy", str(tampered.root)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"record {bad_seq}" in result.stdout


def test_audit_records_refusals_without_a_live_key(
    stack: Stack, digits_model: DigitsFixture
) -> None:
    """terms_required carries the key; unauthenticated ones carry only the address, counted
    per address and interval (``audit_aggregate_s``: 0.5 s here)."""
    body = _body(_images(digits_model))
    # From an address of its own: refusals are counted per address and interval, so one of
    # another test's moments earlier would hold this one's count in its interval.
    source = "127.0.0.61"
    with stack.http(stack.keys["unaccepted"] + "x", source=source) as http:  # malformed token
        assert http.post(INFER.format("digits"), json=body).status_code == 401
    fresh = issue_key(stack.layout, "audit-terms", accept_terms=False)
    with stack.http(fresh) as http:
        assert http.post(INFER.format("digits"), json=body).status_code == 403

    def terms_record() -> bool:
        return any(r["decision"] == "terms_required" for r in _export(stack, _key_id(fresh)))

    _poll(terms_record, "the terms_required record")
    (record,) = _export(stack, _key_id(fresh))
    assert record["status"] == 403 and record["client"] == "127.0.0.1"
    assert record["input_sha256"] is None and record["answer"] is None
    rows: list[tuple[Any, ...]] = []

    def unauthenticated_record() -> bool:
        with contextlib.closing(sqlite3.connect(stack.state / AUDIT_DB)) as db:
            rows[:] = db.execute(
                "SELECT key_id, client, model, status, count FROM audit "
                "WHERE decision = 'unauthenticated' AND client = ?",
                (source,),
            ).fetchall()
        return bool(rows)

    _poll(unauthenticated_record, "the aggregated unauthenticated record")
    assert rows == [(None, source, "digits", 401, 1)]


# --- metrics ------------------------------------------------------------------------------


def test_metrics_count_served_and_refused_requests(
    stack: Stack, digits_model: DigitsFixture
) -> None:
    secret = _fresh_key(stack, "metrics", rate_per_s=SLOW_RATE, burst=35)  # 5 x 7 samples
    key_id = _key_id(secret)
    body = _body(_images(digits_model, 7))
    with stack.http() as anonymous:
        _assert_error(anonymous.get("/v2/models/digits"), 401)  # counted, whatever ran before
    before = _samples(httpx.get(stack.public.metrics_url, timeout=10).text)
    private_before = stack.private_metrics()
    with stack.http(secret) as http:
        statuses = [http.post(INFER.format("digits"), json=body).status_code for _ in range(6)]
    assert statuses == [200] * 5 + [429]
    reply = httpx.get(stack.public.metrics_url, timeout=10)
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/plain")
    after = _samples(reply.text)

    def delta(name: str, **labels: str) -> float:
        return _value(after, name, **labels) - _value(before, name, **labels)

    assert delta("splitvault_requests_total", model="digits", status="200") == 5
    assert delta("splitvault_requests_total", model="digits", status="429") == 1
    assert delta("splitvault_rate_limited_total", model="digits", scope="key") == 1
    assert delta("splitvault_request_seconds_count", model="digits") == 6
    assert delta("splitvault_front_seconds_count", model="digits") == 5
    assert delta("splitvault_private_call_seconds_count", model="digits") == 5
    assert ("splitvault_key_risk_score", (("key_id", key_id),)) in after
    assert 0.0 <= _value(after, "splitvault_key_risk_score", key_id=key_id) <= 1.0
    assert _value(after, "splitvault_unauthenticated_total") >= 1

    private_after = stack.private_metrics()
    rows = "splitvault_private_batch_size_sum"
    assert (
        _value(private_after, rows, model="digits") - _value(private_before, rows, model="digits")
        == 5 * 7
    )
    batches = "splitvault_private_batch_size_count"
    assert (
        1
        <= _value(private_after, batches, model="digits")
        - _value(private_before, batches, model="digits")
        <= 5
    )
    assert _value(private_after, "splitvault_back_stage_seconds_count", model="digits") > 0


# --- extraction monitor -------------------------------------------------------------------


def _monitor_show(root: Path) -> tuple[int, str]:
    """``splitvault monitor show``: through the CLI when wired, else its parser in-process."""
    result = subprocess.run(
        [sys.executable, "-m", "splitvault", "monitor", "show", "--deploy", str(root)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if "invalid choice: 'monitor'" not in result.stderr:
        return result.returncode, result.stdout
    parser = argparse.ArgumentParser()
    add_monitor_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["monitor", "show", "--deploy", str(root)])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = int(args.run(args))
    return code, out.getvalue()


def test_monitor_blocks_a_synthetic_query_stream(stack: Stack, public_v2: TierProcess) -> None:
    secret, key_id = stack.keys["extractor"], _key_id(stack.keys["extractor"])
    rng = np.random.default_rng(0)
    statuses: list[int] = []
    with stack.http(secret, tier=public_v2) as http:
        assert http.post("/v1/terms/accept", json={"version": "2"}).status_code == 200
        for _ in range(40):  # ~24 batches of uniform noise are blocked in-process
            noise = rng.uniform(0.0, 1.0, (64, 1, 8, 8)).astype(np.float32)
            reply = http.post(INFER.format("digits"), json=_body(noise))
            statuses.append(reply.status_code)
            if reply.status_code != 200:
                break
        _assert_error(reply, 403, "blocked", key_id)
        assert statuses[:-1] == [200] * (len(statuses) - 1) and len(statuses) > 2
        again = http.post(INFER.format("digits"), json=_body(noise[:1]))
        _assert_error(again, 403, "blocked")
    metrics = _samples(httpx.get(public_v2.metrics_url, timeout=10).text)
    assert _value(metrics, "splitvault_blocked_total", model="digits") == 2
    assert _value(metrics, "splitvault_key_risk_score", key_id=key_id) >= 0.75

    (assessment,) = read_assessments(monitor_log_path(stack.layout.root), key_id)
    assert assessment.level == "blocked" and assessment.reasons
    code, shown = _monitor_show(stack.layout.root)
    assert code == 0
    line = next(line for line in shown.splitlines() if line.startswith(key_id))
    assert "blocked" in line
    assert any("OOD" in reason for reason in assessment.reasons)
    assert assessment.reasons[0] in shown
