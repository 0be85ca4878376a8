"""Two private replicas sharing the private tier's own Redis (issue 13 item 4), real processes.

One deployment (digits), a real ``redis-server`` with a password of its own, and two private
tier processes with their own state folders, both naming that store. The caller is a host
that owns the public tier: it holds the public client certificates and calls the private
replicas directly, with real mutual TLS. A signed request answered by one replica is refused
by the other; a registration made once (``keys signer-register``) is seen by both; a budget
is one budget across both; the store stopped refuses every call, and its return serves again
without restarting the tiers, and meanwhile their gRPC health says NOT_SERVING. A private tier
pointed at a store without a password refuses to start.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from splitvault_client import RequestSigner

from private_core.ledger_service import LEDGER_SERVICE
from private_core.private_redis import STORE_UNAVAILABLE
from private_core.server import SERVICE_NAME
from private_core.signers import SIGNATURES_DB
from private_core.store_health import UNREACHABLE
from protos import inference_pb2, inference_pb2_grpc
from public_api.front import load_front_stages, run_front
from public_api.keys import parse_key_id
from shared.keys import LocalFileKeyProvider
from shared.layout import DeployLayout
from shared.manifest import TopKPolicy
from shared.signatures import SignedRequest
from shared.tensor_codec import to_proto
from splitvault.demo import digits
from splitvault.deploy import add_public_replica, init_deployment, load_ca
from splitvault.ownership.attribution import signer_keys
from splitvault.packing.pack import pack_spec
from tests.conftest import DigitsFixture, issue_key
from tests.support.deployments import pairing_id
from tests.support.processes import TierProcess, start_private, wait_for
from tests.support.redis_server import MISSING, RedisServer
from tests.support.stack import REPO_ROOT, image_request, private_channel, tier_env

pytestmark = pytest.mark.slow

MODEL, ROWS, UNSIGNED_BUDGET = "digits", 10, 100
PASSWORD = "private-store-test-password"
OK, DENIED = grpc.StatusCode.OK, grpc.StatusCode.PERMISSION_DENIED
EXHAUSTED, UNAVAILABLE = grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _budget(daily: int) -> str:
    """A budget whose rate stays out of the way: only the daily budget binds."""
    return json.dumps({"rate_per_s": 1e6, "burst": 1000, "daily_budget": daily})


ENV = {
    **tier_env(),
    "SPLITVAULT_PRIVATE_ADMISSION__UNSIGNED": _budget(UNSIGNED_BUDGET),
    "SPLITVAULT_PRIVATE_SIGNATURE_WINDOW_S": "60",
}


@dataclass
class Caller:
    """A public replica's client certificate, used directly against a private replica."""

    channel: grpc.Channel
    stub: inference_pb2_grpc.PrivateInferenceStub

    def infer(self, request: inference_pb2.InferRequest) -> tuple[grpc.StatusCode, Any]:
        """The status code and the error (None when answered)."""
        try:
            self.stub.Infer(request, timeout=30)
        except grpc.RpcError as error:
            return error.code(), error
        return OK, None


@dataclass
class Shared:
    """The deployment, the store, the signing customer and two private replicas."""

    layout: DeployLayout
    redis: RedisServer
    store_env: dict[str, str]
    key_id: str
    signing_key: Path
    images: np.ndarray
    replicas: tuple[TierProcess, TierProcess]
    state_dirs: tuple[Path, Path]
    callers: list[Caller]

    def caller(self, replica: int, tls: Path | None = None) -> Caller:
        """Replica 0 or 1, called with public replica 1's certificate (or those in ``tls``)."""
        tls = tls or self.layout.public.tls
        channel = private_channel(self.layout, self.replicas[replica].port, tls)
        caller = Caller(channel, inference_pb2_grpc.PrivateInferenceStub(channel))
        self.callers.append(caller)
        return caller

    def request(
        self, rows: int = ROWS, *, signed: bool = False, key_id: str = ""
    ) -> inference_pb2.InferRequest:
        """The front's activations of ``rows`` digits, signed by the customer if asked."""
        images = self.images[:rows]
        stage = load_front_stages(self.layout.public)[MODEL]
        outputs = run_front(stage, {"image": np.ascontiguousarray(images, dtype=np.float32)})
        signature = None
        if signed:
            body = json.dumps(image_request(images)).encode()
            headers = RequestSigner.load(self.signing_key).headers(
                MODEL, body, {"image": (rows, 1, 8, 8)}, 3
            )
            found = SignedRequest.from_headers("POST", {k.lower(): v for k, v in headers.items()})
            assert found is not None
            signature = inference_pb2.RequestSignature(**found.record())
            key_id = self.key_id
        return inference_pb2.InferRequest(
            model=MODEL,
            inputs=[to_proto(name, value) for name, value in outputs.items()],
            top_k=3,
            request_id=f"store-{time.monotonic_ns()}",
            key_id=key_id,
            signature=signature,
            pairing_id=pairing_id(self.layout, MODEL),
        )


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "splitvault", *args],
        cwd=REPO_ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def _deployment(root: Path, digits_model: DigitsFixture) -> DeployLayout:
    layout = init_deployment(root / "d")
    pack_spec(
        digits_model.spec,
        name=MODEL,
        split=digits.SPLIT,
        layout=layout,
        provider=LocalFileKeyProvider.load(layout.kek),
        policy=TopKPolicy(k=3),
        show_progress=False,
    )
    add_public_replica(layout, load_ca(layout))
    return layout


def _register_signer(
    layout: DeployLayout, store_env: dict[str, str], root: Path
) -> tuple[str, Path]:
    """The customer makes a key; the operator registers it once, in the private store."""
    key_id = parse_key_id(issue_key(layout, "signer"))
    assert key_id is not None
    listing = _cli(store_env, "keys", "signers", "--deploy", str(layout.root))
    deployment = listing.stdout.split()[2]
    key_file = root / "customer" / "signing-key.json"
    key_file.parent.mkdir()
    created = _cli(store_env, "keys", "signer-create", "--key-id", key_id,
                   "--deployment", deployment, "--out", str(key_file))  # fmt: skip
    public_key = created.stdout.split("--public-key ")[1].strip()
    done = _cli(store_env, "keys", "signer-register", "--deploy", str(layout.root),
                "--key-id", key_id, "--public-key", public_key)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return key_id, key_file


@pytest.fixture(scope="module")
def shared(
    tmp_path_factory: pytest.TempPathFactory, digits_model: DigitsFixture
) -> Iterator[Shared]:
    if shutil.which("redis-server") is None:
        pytest.skip(MISSING)
    root = tmp_path_factory.mktemp("privstore")
    layout = _deployment(root, digits_model)
    secret = root / "secrets" / "private-redis-password"
    secret.parent.mkdir(mode=0o700)
    secret.write_text(PASSWORD)
    secret.chmod(0o600)
    redis = RedisServer(root / "redis", password=PASSWORD).start()
    store_env = {
        "SPLITVAULT_PRIVATE_STATE_STORE__REDIS_URL": redis.url,
        "SPLITVAULT_PRIVATE_STATE_STORE__PASSWORD_FILE": str(secret),
    }
    callers: list[Caller] = []
    replicas: list[TierProcess] = []
    try:
        key_id, key_file = _register_signer(layout, store_env, root)
        state_dirs = (root / "state-a", root / "state-b")
        for state in state_dirs:
            env = {**ENV, **store_env, "SPLITVAULT_PRIVATE_STATE_DIR": str(state)}
            replicas.append(start_private(layout.root, env=env))
        yield Shared(
            layout, redis, store_env, key_id, key_file, digits_model.data.test_x,
            (replicas[0], replicas[1]), state_dirs, callers,
        )  # fmt: skip
    finally:
        for caller in callers:
            caller.channel.close()
        for replica in replicas:
            replica.stop()
        redis.stop()


def test_a_registration_made_once_is_seen_by_both_replicas(shared: Shared) -> None:
    for replica in (0, 1):
        caller = shared.caller(replica)
        code, error = caller.infer(shared.request(key_id=shared.key_id))  # unsigned: refused
        assert code == DENIED and "signs its requests" in error.details()
        assert caller.infer(shared.request(signed=True))[0] == OK
    for state in shared.state_dirs:  # the registration lives in the store, not in a folder
        assert not (state / SIGNATURES_DB).exists()
    # ... and the owner's evidence finds it there, to verify signed records offline.
    with pytest.MonkeyPatch.context() as patch:
        for name, value in shared.store_env.items():
            patch.setenv(name, value)
        assert list(signer_keys(shared.layout.root)) == [shared.key_id]


def test_a_signed_request_answered_by_one_replica_is_refused_by_the_other(
    shared: Shared,
) -> None:
    captured = shared.request(signed=True)
    assert shared.caller(0).infer(captured)[0] == OK
    code, error = shared.caller(1).infer(captured)
    assert code == DENIED and "already answered" in error.details()
    assert shared.caller(0).infer(captured)[0] == DENIED  # nor again by the first
    (event,) = [
        e
        for e in shared.replicas[1].wait_for_events("request_signature_refused", count=1)
        if e.get("request_id") == captured.request_id
    ]
    assert "already answered" in event["reason"]


def test_a_budget_is_one_budget_across_both_replicas(shared: Shared) -> None:
    """Public replica 2's unsigned traffic, sent to both private replicas in turn: together
    they admit exactly its budget, then both refuse."""
    tls = shared.layout.public_replicas / "splitvault-public-2"
    callers = (shared.caller(0, tls), shared.caller(1, tls))
    request, admitted, refusals = shared.request(), 0, []
    for turn in range(2 * UNSIGNED_BUDGET // ROWS + 2):
        code, error = callers[turn % 2].infer(request)
        if code == OK:
            admitted += ROWS
        else:
            refusals.append((code, dict(error.trailing_metadata())))
    assert admitted == UNSIGNED_BUDGET
    assert len(refusals) == 2 + UNSIGNED_BUDGET // ROWS  # every call after the budget
    assert {code for code, _ in refusals} == {EXHAUSTED}
    assert {t["splitvault-reason"] for _, t in refusals} == {"identity_budget"}


def test_the_store_stopped_refuses_and_its_return_serves_without_restarts(
    shared: Shared,
) -> None:
    callers = (shared.caller(0), shared.caller(1))
    shared.redis.stop()
    for caller in callers:
        for request in (shared.request(), shared.request(signed=True)):
            code, error = caller.infer(request)
            assert code == UNAVAILABLE and error.details() == STORE_UNAVAILABLE
    for replica in shared.replicas:
        replica.wait_for_events("private_store_unavailable")
    shared.redis.start()  # the same address; this test server keeps no data across restarts
    for caller in callers:
        assert caller.infer(shared.request())[0] == OK
    for replica in shared.replicas:
        replica.wait_for_events("private_store_recovered")
        assert replica.process.poll() is None  # never restarted


def _health(caller: Caller, service: str = "") -> Any:
    """The replica's health status of ``service`` (the public replica may ask it)."""
    stub = health_pb2_grpc.HealthStub(caller.channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


def _store_ok(replica: TierProcess) -> float:
    """``splitvault_private_store_ok`` on the replica's metrics listener."""
    text = httpx.get(replica.metrics_url, timeout=10).text
    (value,) = [
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "splitvault_private_store_ok"
    ]
    return value


def test_health_is_not_serving_while_the_store_is_down(shared: Shared) -> None:
    callers = (shared.caller(0), shared.caller(1))
    for caller, replica in zip(callers, shared.replicas, strict=True):
        # SERVING (within its watcher's second of a store restarted by an earlier test)
        wait_for(lambda c=caller: _health(c) == SERVING, timeout=30, what="SERVING at first")
        assert _store_ok(replica) == 1.0
    # An earlier test's outage may already have been logged, if a watcher saw it.
    seen = [_events(replica, "private_tier_not_serving") for replica in shared.replicas]
    shared.redis.stop()
    for caller, replica, before in zip(callers, shared.replicas, seen, strict=True):
        wait_for(lambda c=caller: _health(c) == NOT_SERVING, timeout=30, what="NOT_SERVING")
        assert _health(caller, SERVICE_NAME) == NOT_SERVING
        assert _health(caller, LEDGER_SERVICE) == SERVING  # the ledger is local: unaffected
        assert _store_ok(replica) == 0.0
        (event,) = replica.wait_for_events("private_tier_not_serving", count=before + 1)[before:]
        assert event["reason"] == UNREACHABLE and event["level"] == "error"
        assert caller.infer(shared.request())[0] == UNAVAILABLE  # what health says: refused
    shared.redis.start()
    for caller, replica in zip(callers, shared.replicas, strict=True):
        wait_for(lambda c=caller: _health(c) == SERVING, timeout=30, what="SERVING again")
        assert _health(caller, SERVICE_NAME) == SERVING
        assert _store_ok(replica) == 1.0
        replica.wait_for_events("private_tier_serving")
        assert caller.infer(shared.request())[0] == OK
        assert replica.process.poll() is None  # never restarted


def _events(tier: TierProcess, name: str) -> int:
    return sum(1 for event in tier.events() if event.get("event") == name)


def test_a_private_tier_refuses_to_start_on_a_store_without_a_password(
    shared: Shared, tmp_path: Path
) -> None:
    with RedisServer(tmp_path / "open") as open_store:  # no password: anyone may write it
        env = {
            **ENV,
            **shared.store_env,
            "SPLITVAULT_PRIVATE_STATE_STORE__REDIS_URL": open_store.url,
            "SPLITVAULT_PRIVATE_STATE_DIR": str(tmp_path / "state"),
            "SPLITVAULT_PRIVATE_METRICS_PORT": "0",
        }
        done = _cli(env, "serve", "private", "--deploy", str(shared.layout.root), "--port", "0")
    assert done.returncode == 1
    events = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    events += [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    (refused,) = [e for e in events if e.get("event") == "private_store_refused"]
    assert "without a password" in refused["reason"]
    assert not any(e.get("event") == "private_tier_listening" for e in events)
