"""Faults with real processes: tiers killed, stopped and restarted under load, a replica lost,
and audit storage that cannot write. Each ends in a stated outcome: requests answered 503
within the deadline (never hung), serving resumed, in-flight requests drained, and every
request accounted for in the audit trail exactly once.

The module runs its own copy of the session deployment (digits plus a deliberately slow model,
no MiniLM) with a private tier and a public tier on fixed ports, so that a tier can be replaced
by a new process on the same address; the public tier also lists a second replica's address,
where a replica runs only during the replica test. Its state folder is a small tmpfs that the
audit storage test fills (where this process may mount; else a held write lock stands in).
Redis going down while it backs the limits (fail closed, then recovery) is covered by
tests/integration/test_protection_redis.py.
"""

from __future__ import annotations

import contextlib
import signal
import sqlite3
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from splitvault_client import Client, SplitVaultClientError
from splitvault_client import Unavailable as ClientUnavailable
from torch import nn

from public_api.audit import AUDIT_DB, export_records, verify_chain
from public_api.keys import STATE_DIR, parse_key_id
from shared.layout import DeployLayout
from shared.manifest import TopKPolicy
from splitvault.packing.pack import pack_spec
from splitvault.packing.spec import ModelSpec
from tests.conftest import Deployment, issue_key
from tests.support.ports import PUBLIC_REUSE_PORT, ReservedPort
from tests.support.processes import TierProcess, start_public, start_tier
from tests.support.stack import PROTECTION, cli, copy_deployment, https, poll, tier_env

pytestmark = pytest.mark.slow

DEADLINE_S = 2.0  # the public tier's deadline for each private-tier call
# Scheduling slack on top of a deadline or a backoff: a loaded 2-core machine delays a request
# by seconds; a hang lasts until the clients' own timeout (DEADLINE_S + 8), which this stays under.
SLACK_S = 5.0
MAX_RECONNECT_BACKOFF_S = 2.0  # public_api/private_client.py: grpc.max_reconnect_backoff_ms
# A key stays cached for the longest time allowed: a storage fault tests the audit trail's
# policy, not a key-store read (which answers 503 too, with its own message).
PUBLIC_ENV = {
    **tier_env(key_cache_s=300),
    "SPLITVAULT_PUBLIC_REQUEST_TIMEOUT_S": str(DEADLINE_S),
}
DIGITS = "/v2/models/digits/infer"
SLOW = "/v2/models/slow/infer"
IMAGE = [0.5] * 64
WIDTH, ROUNDS = 1024, 150  # ~0.9 s of back-stage compute for a batch of 64 on one thread
# Drained requests: two full batches (too large to share one), computed side by side in the
# private tier's two workers, so that both finish inside the deadline.
DRAIN_BATCH, DRAINED = 64, 2


class Spin(nn.Module):
    """Compute without many weights: one square matrix applied ``rounds`` times."""

    def __init__(self, width: int, rounds: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(width, width) / width**0.5)
        self.rounds = rounds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(self.rounds):
            x = torch.tanh(x @ self.weight)
        return x


class SlowNet(nn.Module):
    """A tiny front and a back stage slow enough to be caught in flight."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(16, WIDTH)
        self.spin = Spin(WIDTH, ROUNDS)
        self.head = nn.Linear(WIDTH, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.head(self.spin(self.embed(x)))
        return logits


def _slow_spec() -> ModelSpec:
    torch.manual_seed(3)
    return ModelSpec(
        module=SlowNet().eval(),
        example_inputs={"x": torch.randn(2, 16)},
        max_sizes={"batch": 64},
    )


class StorageFault:
    """Makes the audit trail's storage unwritable for real, then gives it back.

    A small tmpfs mounted on the public tier's state folder and filled to the last byte (disk
    full) when this process may mount; otherwise another connection holding the database's
    write lock (the writer's busy timeout then fails its transaction).
    """

    def __init__(self, state: Path) -> None:
        self.state = state
        self.mounted = _try_mount_tmpfs(state)
        self.kind = "disk full" if self.mounted else "write lock held"
        self._filler = state / "filler"
        self._lock: sqlite3.Connection | None = None

    def fail(self) -> None:
        if self.mounted:
            # Unbuffered: the write that finds the disk full raises, and close has nothing left.
            with self._filler.open("wb", buffering=0) as filler, contextlib.suppress(OSError):
                while True:
                    filler.write(b"\0" * 65536)
            return
        self._lock = sqlite3.connect(self.state / AUDIT_DB, isolation_level=None)
        self._lock.execute("BEGIN EXCLUSIVE")

    def recover(self) -> None:
        if self.mounted:
            self._filler.unlink()
            return
        assert self._lock is not None
        self._lock.execute("COMMIT")
        self._lock.close()

    def close(self) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.state)], check=False, capture_output=True)


def _try_mount_tmpfs(state: Path) -> bool:
    state.mkdir(parents=True, exist_ok=True)
    mount = ["mount", "-t", "tmpfs", "-o", "size=64m,mode=0700", "tmpfs", str(state)]
    try:
        return subprocess.run(mount, capture_output=True, check=False, timeout=10).returncode == 0
    except OSError:
        return False


@dataclass
class Faults:
    """The module's deployment copy, its key and the tiers now serving it."""

    layout: DeployLayout
    key: str
    private_port: int
    public_port: int
    private: TierProcess
    public: TierProcess
    storage: StorageFault
    # A second replica's address, also given to the public tier; a replica runs there only
    # in the replica test (until then round robin skips the address it cannot reach).
    replica_port: int

    @property
    def key_id(self) -> str:
        key_id = parse_key_id(self.key)
        assert key_id is not None
        return key_id

    @property
    def url(self) -> str:
        return f"https://localhost:{self.public_port}"

    def http(self, **kwargs: Any) -> httpx.Client:
        return https(self.layout, self.public_port, self.key, **kwargs)

    def start_private(self, port: int | None = None, state: Path | None = None) -> TierProcess:
        """A private tier on ``port`` (default: the module's fixed private port) and ``state``
        (default: the deployment's private state folder; a second replica needs its own)."""
        return _start_private(self.layout, port or self.private_port, state)

    def start_public(self) -> TierProcess:
        """A public tier on the module's fixed public port."""
        ports = (self.private_port, self.replica_port)
        return _start_public(self.layout, ports, self.public_port)

    def served(self, key_id: str | None = None) -> list[dict[str, Any]]:
        """The audit records of a key (default: the module's key)."""
        path = self.layout.public.root / STATE_DIR / AUDIT_DB
        return list(export_records(path, key_id or self.key_id))


def _start_private(layout: DeployLayout, port: int, state: Path | None = None) -> TierProcess:
    args = ["serve", "private", "--deploy", str(layout.root), "--port", str(port)]
    env = {**tier_env(), "SPLITVAULT_PRIVATE_METRICS_PORT": "0"}
    if state is not None:
        env["SPLITVAULT_PRIVATE_STATE_DIR"] = str(state)
    return start_tier(args, "private_tier_listening", env=env)


def _start_public(layout: DeployLayout, private_ports: tuple[int, int], port: int) -> TierProcess:
    env = {**PUBLIC_ENV, **PUBLIC_REUSE_PORT, **_audit_env("refuse")}
    first, second = private_ports
    extra = ["--port", str(port), "--private", f"127.0.0.1:{second}"]
    return start_public(layout.root, first, env=env, extra=extra)


@pytest.fixture(scope="module")
def faults(deployment: Deployment, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Faults]:
    root = tmp_path_factory.mktemp("faults") / "d"
    layout = copy_deployment(deployment.root, root, skip_models={"minilm", "nested"})
    pack_spec(
        _slow_spec(),
        name="slow",
        split="embed",
        layout=layout,
        provider=deployment.provider,
        policy=TopKPolicy(k=3),
        show_progress=False,
    )
    storage = StorageFault(layout.public.root / STATE_DIR)  # for the "refuse" policy test
    stack_ports = ExitStack()
    try:
        key = issue_key(layout, "faults")
        # The tests restart tiers on the same addresses: the module holds them meanwhile.
        reserved = [stack_ports.enter_context(ReservedPort()) for _ in range(3)]
        private_port, replica_port, public_port = (port.port for port in reserved)
        private = _start_private(layout, private_port)
        try:
            public = _start_public(layout, (private_port, replica_port), public_port)
        except BaseException:
            private.stop()
            raise
        stack = Faults(
            layout, key, private_port, public_port, private, public, storage, replica_port
        )
        try:
            yield stack
        finally:
            stack.public.stop()
            stack.private.stop()
    finally:
        stack_ports.close()
        storage.close()


# --- load ---------------------------------------------------------------------------------


@dataclass
class Outcome:
    """One request: its id, when it ran, and its status (or the client-side error)."""

    request_id: str
    started: float
    ended: float
    status: int | None = None
    error: str | None = None
    body: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)


def _digits_body(request_id: str) -> dict[str, Any]:
    shape = [1, 1, 8, 8]
    return {
        "id": request_id,
        "inputs": [{"name": "image", "shape": shape, "datatype": "FP32", "data": IMAGE}],
    }


def _slow_body(request_id: str, batch: int = DRAIN_BATCH) -> dict[str, Any]:
    data = np.random.default_rng(batch).standard_normal(batch * 16).round(3).tolist()
    tensor = {"name": "x", "shape": [batch, 16], "datatype": "FP32", "data": data}
    return {"id": request_id, "inputs": [tensor]}


def _send(http: httpx.Client, path: str, body: dict[str, Any]) -> Outcome:
    started = time.monotonic()
    outcome = Outcome(body["id"], started, started)
    try:
        reply = http.post(path, json=body)
    except httpx.HTTPError as error:
        outcome.error = type(error).__name__
    else:
        outcome.status = reply.status_code
        outcome.headers = dict(reply.headers)
        with contextlib.suppress(ValueError):
            outcome.body = reply.json()
    outcome.ended = time.monotonic()
    return outcome


class Load:
    """``threads`` clients sending digits requests with fresh ids until stopped."""

    def __init__(self, faults: Faults, threads: int = 3, pause_s: float = 0.05) -> None:
        self.outcomes: list[Outcome] = []
        self._faults = faults
        self._pause_s = pause_s
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run) for _ in range(threads)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def count(self, status: int | None, after: float = 0.0) -> int:
        return sum(1 for o in list(self.outcomes) if o.status == status and o.started >= after)

    def _run(self) -> None:
        # The client's own timeout bounds every request: nothing may hang past it.
        with self._faults.http(timeout=DEADLINE_S + 8) as http:
            while not self._stop.is_set():
                self.outcomes.append(_send(http, DIGITS, _digits_body(uuid.uuid4().hex)))
                self._stop.wait(self._pause_s)


@contextlib.contextmanager
def _in_flight(faults: Faults, count: int) -> Iterator[list[Future[Outcome]]]:
    """``count`` slow requests, each on its own warmed-up connection, started now."""
    with contextlib.ExitStack() as stack:
        clients = [stack.enter_context(faults.http(timeout=60)) for _ in range(count)]
        for http in clients:
            assert http.get("/v2/health/live").status_code == 200  # TLS handshake done before
        pool = stack.enter_context(ThreadPoolExecutor(count))
        yield [
            pool.submit(_send, http, SLOW, _slow_body(f"slow-{uuid.uuid4().hex}"))
            for http in clients
        ]


def _slow_batches_started(faults: Faults) -> float:
    """Requests of the slow model whose back-stage batch has started on the private tier."""
    return _private_metric(
        faults.private, "splitvault_private_queue_wait_seconds_count", model="slow"
    )


def _private_metric(tier: TierProcess, name: str, **labels: str) -> float:
    """The sum of metric ``name``'s samples with ``labels`` on private tier ``tier``."""
    (port,) = [
        e["metrics_port"] for e in tier.events() if e.get("event") == "private_tier_listening"
    ]
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


def _slow_latency(faults: Faults) -> float:
    with faults.http(timeout=60) as http:
        outcome = _send(http, SLOW, _slow_body(f"warm-up-{uuid.uuid4().hex}"))
    assert outcome.status == 200, outcome
    return outcome.ended - outcome.started


def _assert_accounted_once(faults: Faults, outcomes: list[Outcome]) -> None:
    """Every request has exactly one audit record, whose decision matches what it got."""
    expected = {o.request_id: o.status for o in outcomes}

    def complete() -> bool:
        ids = {r["request_id"] for r in faults.served()}
        return set(expected) <= ids

    poll(complete, "every request to reach the audit trail", timeout=10)
    records: dict[str, list[dict[str, Any]]] = {}
    for record in faults.served():
        if record["request_id"] in expected:
            records.setdefault(record["request_id"], []).append(record)
    decisions = {200: "served", 503: "unavailable"}
    for request_id, status in expected.items():
        found = records[request_id]
        assert len(found) == 1, found
        assert (found[0]["decision"], found[0]["status"]) == (decisions[status or 0], status)


# --- private tier faults ------------------------------------------------------------------


def test_private_sigterm_drains_in_flight_requests(faults: Faults) -> None:
    _slow_latency(faults)
    started = _slow_batches_started(faults)
    with _in_flight(faults, DRAINED) as futures:
        # Both are computing on the private tier (their batches started), far from done.
        poll(lambda: _slow_batches_started(faults) >= started + DRAINED, "slow batches to start")
        signalled = time.monotonic()
        faults.private.process.send_signal(signal.SIGTERM)
        outcomes = [future.result(timeout=60) for future in futures]
    assert faults.private.process.wait(30) == 0
    assert faults.private.wait_for_events("private_tier_stopping")
    assert [o.status for o in outcomes] == [200] * DRAINED, outcomes
    assert all(o.ended > signalled for o in outcomes)  # they really were in flight
    faults.private.stop()
    faults.private = faults.start_private()
    with faults.http() as http:
        poll(lambda: http.get("/v2/health/ready").status_code == 200, "readiness", 15)


def test_private_killed_under_load(faults: Faults) -> None:
    with faults.http(timeout=10) as http, Load(faults) as load:
        poll(lambda: load.count(200) >= 10, "load to be served")
        killed = time.monotonic()
        faults.private.process.kill()
        faults.private.stop()
        poll(lambda: http.get("/v2/health/ready").status_code == 503, "not ready", 10)
        poll(lambda: load.count(503, after=killed) >= 10, "requests refused with 503")
        not_ready = http.get("/v2/models/digits/ready")
        faults.private = faults.start_private()  # a new process on the same address
        back = time.monotonic()
        resumed = poll(lambda: load.count(200, after=back) > 0, "serving to resume", 20)
        poll(lambda: http.get("/v2/health/ready").status_code == 200, "ready again", 10)
    outcomes = load.outcomes
    assert {o.error for o in outcomes} == {None}, [o for o in outcomes if o.error][:3]
    assert {o.status for o in outcomes} == {200, 503}
    refused = [o for o in outcomes if o.status == 503]
    assert max(o.ended - o.started for o in refused) < DEADLINE_S + SLACK_S
    assert all(o.body.get("error") and o.headers.get("retry-after") for o in refused)
    assert not_ready.status_code == 503 and "error" in not_ready.json()
    # The channel retries at most every MAX_RECONNECT_BACKOFF_S, not gRPC's default 120 s.
    assert resumed < MAX_RECONNECT_BACKOFF_S + SLACK_S, f"serving resumed after {resumed:.1f}s"
    _assert_accounted_once(faults, outcomes)
    verified = cli("audit", "verify", deploy=faults.layout.root)  # the operator's check
    assert verified.returncode == 0 and " OK: " in verified.stdout, verified.stdout


def test_private_frozen_requests_get_503_at_the_deadline(faults: Faults) -> None:
    """A private tier that stops answering (SIGSTOP) without closing its connections."""
    with faults.http(timeout=10) as http, Load(faults) as load:
        poll(lambda: load.count(200) >= 5, "load to be served")
        faults.private.process.send_signal(signal.SIGSTOP)
        frozen = time.monotonic()
        try:
            poll(lambda: load.count(503, after=frozen) >= 6, "requests to reach the deadline")
            ready = http.get("/v2/health/ready")
        finally:
            faults.private.process.send_signal(signal.SIGCONT)
        thawed = time.monotonic()
        poll(lambda: load.count(200, after=thawed) >= 5, "serving after the thaw")
    outcomes = load.outcomes
    assert {o.error for o in outcomes} == {None}, [o for o in outcomes if o.error][:3]
    timed_out = [o for o in outcomes if o.status == 503 and frozen < o.started < thawed]
    assert len(timed_out) >= 6
    for outcome in timed_out:  # each waited for the deadline, and no longer
        assert DEADLINE_S - 0.2 < outcome.ended - outcome.started < DEADLINE_S + SLACK_S, outcome
        assert "did not answer in time" in outcome.body["error"]
    assert ready.status_code == 503
    _assert_accounted_once(faults, outcomes)


# --- public tier faults -------------------------------------------------------------------


@dataclass
class SdkCall:
    """One SDK prediction: its id, when it started, and what it returned or raised."""

    request_id: str
    started: float
    ok: bool
    error: SplitVaultClientError | None = None


class SdkLoad:
    """SDK clients with 3 retries and backoff: two predicting, one reading model metadata.

    The backoff (2.5, 5, 10 s) lets one call outlast a public tier's restart on this machine.
    """

    def __init__(self, faults: Faults) -> None:
        self.calls: list[SdkCall] = []
        self.reads: list[SdkCall] = []
        self._faults = faults
        self._stop = threading.Event()
        targets = [self._predict, self._predict, self._read]
        self._threads = [threading.Thread(target=target) for target in targets]

    def __enter__(self) -> SdkLoad:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)

    def _client(self) -> Client:
        ca = self._faults.layout.public.ca_cert
        key = self._faults.key
        return Client(self._faults.url, api_key=key, ca=ca, retries=3, backoff=2.5, timeout=20)

    def _predict(self) -> None:
        image = np.full((1, 1, 8, 8), 0.5, dtype=np.float32)
        with self._client() as client:
            while not self._stop.is_set():
                call = SdkCall(uuid.uuid4().hex, time.monotonic(), ok=False)
                try:
                    client.predict("digits", image, request_id=call.request_id)
                    call.ok = True
                except SplitVaultClientError as error:
                    call.error = error
                self.calls.append(call)
                self._stop.wait(0.05)

    def _read(self) -> None:
        with self._client() as client:
            while not self._stop.is_set():
                call = SdkCall("metadata", time.monotonic(), ok=False)
                try:
                    call.ok = client.model_metadata("digits").name == "digits"
                except SplitVaultClientError as error:
                    call.error = error
                self.reads.append(call)
                self._stop.wait(0.05)


def test_public_sigterm_drains_then_sdk_retries_across_the_restart(faults: Faults) -> None:
    _slow_latency(faults)
    with SdkLoad(faults) as sdk:
        poll(lambda: sum(c.ok for c in sdk.calls) >= 3, "SDK calls to be served")
        started = _slow_batches_started(faults)
        with _in_flight(faults, DRAINED) as futures:
            # Both are computing on the private tier (their batches started), far from done.
            poll(lambda: _slow_batches_started(faults) >= started + DRAINED, "slow batches")
            signalled = time.monotonic()
            faults.public.process.send_signal(signal.SIGTERM)
            drained = [future.result(timeout=60) for future in futures]
        exit_code = faults.public.process.wait(30)
        faults.public.stop()
        faults.public = faults.start_public()
        back = time.monotonic()
        poll(lambda: any(c.ok and c.started > back for c in sdk.calls), "SDK calls after restart")
    assert exit_code == 0
    assert [o.status for o in drained] == [200] * DRAINED, drained
    assert all(o.ended > signalled for o in drained)
    calls = sdk.calls
    for made in (calls, sdk.reads):
        failed = [c for c in made if not c.ok]
        assert all(isinstance(c.error, ClientUnavailable) for c in failed), failed[:3]
        # A call made while no tier listened succeeded after its retries (connection refused:
        # the request was never sent, so retrying even an inference is safe).
        assert any(c.ok and signalled < c.started < back for c in made), made[-10:]
    served: dict[str, int] = {}
    poll(
        lambda: {c.request_id for c in calls if c.ok} <= {r["request_id"] for r in faults.served()},
        "SDK calls to reach the audit trail",
        10,
    )
    for record in faults.served():
        if record["decision"] == "served" and record["request_id"] is not None:
            served[record["request_id"]] = served.get(record["request_id"], 0) + 1
    assert all(served.get(c.request_id) == 1 for c in calls if c.ok)
    assert max(served.values()) == 1  # no request served (and recorded) twice


# --- replicas -----------------------------------------------------------------------------


def _requests_served(tier: TierProcess) -> float:
    return _private_metric(tier, "splitvault_private_requests_total", code="OK")


def test_one_replica_killed_the_others_keep_serving(faults: Faults) -> None:
    # The public tier knows its address; it has a state folder of its own, as every replica.
    replica = faults.start_private(faults.replica_port, faults.layout.private.root / "state-2")
    try:
        before = _requests_served(faults.private)
        with Load(faults) as load:
            poll(lambda: _requests_served(replica) >= 5, "the second replica to serve")
            poll(lambda: _requests_served(faults.private) >= before + 5, "the first replica")
            killed = time.monotonic()
            replica.process.kill()
            poll(lambda: load.count(200, after=killed + 1.0) >= 30, "serving after the kill")
    finally:
        replica.stop()
    transition = [o for o in load.outcomes if killed - 0.5 <= o.started < killed + 1.0]
    after = [o for o in load.outcomes if o.started >= killed + 1.0]
    failures = [o for o in transition if o.status != 200]
    assert len(failures) <= 6, failures  # at most the calls in flight on the lost replica
    assert after and all(o.status == 200 for o in after), [o for o in after if o.status != 200]


# --- audit storage ------------------------------------------------------------------------


POLICIES = ("refuse", "buffer")
BUFFER_MAX = 8


@dataclass
class AuditStack:
    """A public tier whose state folder can be made unwritable, with its policy and key."""

    layout: DeployLayout
    storage: StorageFault
    key: str
    tier: TierProcess | None = None

    @property
    def trail(self) -> Path:
        return self.layout.public.root / STATE_DIR / AUDIT_DB


@pytest.fixture(scope="module")
def buffer_stack(faults: Faults, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuditStack]:
    """A public tier with the "buffer" policy (own deployment copy and state)."""
    layout = copy_deployment(
        faults.layout.root, tmp_path_factory.mktemp("buffer") / "d", skip_models={"slow"}
    )
    storage = StorageFault(layout.public.root / STATE_DIR)
    try:
        key = issue_key(layout, "buffer")
        tier = _start_audited(layout, faults.private_port, "buffer")
        try:
            yield AuditStack(layout, storage, key, tier)
        finally:
            tier.stop()
    finally:
        storage.close()


@pytest.fixture
def audit_stack(request: pytest.FixtureRequest, faults: Faults) -> AuditStack:
    """The module's own public tier for "refuse" (the default), a second one for "buffer"."""
    if request.param == "buffer":
        stack: AuditStack = request.getfixturevalue("buffer_stack")
        return stack
    return AuditStack(faults.layout, faults.storage, faults.key, faults.public)


def _start_audited(layout: DeployLayout, private_port: int, policy: str) -> TierProcess:
    env = {**PUBLIC_ENV, **_audit_env(policy)}
    return start_public(layout.root, private_port, env=env)


def _audit_env(policy: str) -> dict[str, str]:
    return {
        f"{PROTECTION}AUDIT_ON_FAILURE": policy,
        f"{PROTECTION}AUDIT_BUFFER_MAX": str(BUFFER_MAX),
    }


@pytest.mark.parametrize(
    ("audit_stack", "policy"), [(p, p) for p in POLICIES], indirect=["audit_stack"], ids=POLICIES
)
def test_audit_storage_failure_policy(audit_stack: AuditStack, policy: str) -> None:
    stack = audit_stack
    assert stack.tier is not None
    answered = _exercise_storage_fault(stack, stack.tier, policy)
    key_id = parse_key_id(stack.key) or ""

    def recorded() -> list[str]:
        return [r["request_id"] for r in export_records(stack.trail, key_id)]

    # Never silent loss: every answer served, before, during and after the fault, is recorded.
    poll(lambda: set(answered) <= set(recorded()), "the buffered records to be written", 10)
    records = list(export_records(stack.trail, key_id))
    served = Counter(r["request_id"] for r in records if r["decision"] == "served")
    assert {served[request_id] for request_id in answered} == {1}
    assert verify_chain(stack.trail).ok


def _exercise_storage_fault(stack: AuditStack, tier: TierProcess, policy: str) -> list[str]:
    """Serve, break the storage, check the policy, recover; returns the ids served."""
    storage, buffer_max = stack.storage, BUFFER_MAX
    served: list[Outcome] = []
    refused: list[Outcome] = []
    with https(stack.layout, tier.port, stack.key, timeout=30) as http:

        def request() -> Outcome:
            outcome = _send(http, DIGITS, _digits_body(uuid.uuid4().hex))
            assert outcome.status in (200, 503), outcome
            (served if outcome.status == 200 else refused).append(outcome)
            return outcome

        assert all(request().status == 200 for _ in range(3))
        storage.fail()
        failing = time.monotonic()
        served_before = len(served)
        poll(lambda: request().status == 503, f"a 503 once the storage fails ({storage.kind})", 30)
        served_while_failing = len(served) - served_before
        assert tier.wait_for_events("audit_write_failed")
        message = refused[-1].body["error"]
        if policy == "refuse":
            assert "audit trail cannot write" in message, message
        else:
            # Served while the writer failed, up to the bound, then refused. (A held lock is
            # noticed only after the writer's busy timeout: no bound applies before that.)
            assert served_while_failing >= 1
            assert served_while_failing <= buffer_max or not storage.mounted
            assert f"buffer of {buffer_max} records is full" in message, message
        assert refused[-1].headers.get("retry-after")
        assert [request().status for _ in range(3)] == [503] * 3
        storage.recover()
        poll(lambda: request().status == 200, "serving once storage recovers", 30)
        assert time.monotonic() - failing < 60
    dropped = tier.wait_for_events("audit_record_dropped", count=len(refused))
    assert len(dropped) == len(refused)  # each refusal was logged, not silently lost
    return [o.request_id for o in served]
