"""Issue 13: the private tier's own admission, with real processes and real mutual TLS.

The attacker of issue 13 owns a public host: it has that replica's client certificate and
calls the private tier's ``Infer`` directly with chosen activations. Here it does the same,
against small budgets set in the private tier's settings: its flood is refused with
RESOURCE_EXHAUSTED once the replica's budget is spent, the public tier maps that refusal to 503
with Retry-After, a second replica identity keeps a budget of its own, a key over its
second-line budget gets 429, a restart keeps the day's usage, and NaN, Inf and wrong-dtype
activations are refused before batching (one bad request fails alone in its batch).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest

from private_core.settings import PrivateSettings
from protos import inference_pb2, inference_pb2_grpc
from shared.layout import PRIVATE_IDENTITY, PUBLIC_IDENTITY, DeployLayout
from shared.manifest import DimSpec, read_manifest
from splitvault.deploy import add_public_replica, load_ca
from splitvault.pki import issue_certificate
from tests.conftest import Deployment, DigitsFixture, issue_key
from tests.support.deployments import copy_deployment, pairing_id
from tests.support.inprocess import GatedPool, ThreadedPrivateTier
from tests.support.processes import TierProcess, start_private, start_public
from tests.support.stack import https, image_request, poll, tier_env

pytestmark = pytest.mark.slow

UNSIGNED_BUDGET, IDENTITY_BUDGET, KEY_BUDGET, ROWS = 100, 400, 30, 10
EXHAUSTED, INVALID = grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT


def _budget(daily: int) -> str:
    """A budget whose rate stays out of the way: only the daily budget binds."""
    return json.dumps({"rate_per_s": 1e6, "burst": 1000, "daily_budget": daily})


PRIVATE_ENV = {
    **tier_env(),
    "SPLITVAULT_PRIVATE_ADMISSION__IDENTITY": _budget(IDENTITY_BUDGET),
    "SPLITVAULT_PRIVATE_ADMISSION__UNSIGNED": _budget(UNSIGNED_BUDGET),
    "SPLITVAULT_PRIVATE_ADMISSION__KEY": _budget(KEY_BUDGET),
}


@dataclass(frozen=True)
class Identity:
    """A client certificate and key, PEM."""

    cert: bytes
    key: bytes

    @classmethod
    def read(cls, folder: Path) -> Identity:
        return cls((folder / "client.crt").read_bytes(), (folder / "client.key").read_bytes())


CHANNELS: list[grpc.Channel] = []


@pytest.fixture(autouse=True, scope="module")
def _close_channels() -> Iterator[None]:
    """Close every channel ``_stub`` opened, at the end of the module."""
    yield
    while CHANNELS:
        CHANNELS.pop().close()


def _stub(
    layout: DeployLayout, port: int, who: Identity
) -> inference_pb2_grpc.PrivateInferenceStub:
    """A direct caller of the private tier, as the attacker on a public host is."""
    credentials = grpc.ssl_channel_credentials(
        root_certificates=layout.public.ca_cert.read_bytes(),
        private_key=who.key,
        certificate_chain=who.cert,
    )
    options = [
        ("grpc.ssl_target_name_override", PRIVATE_IDENTITY),
        ("grpc.use_local_subchannel_pool", 1),
    ]
    channel = grpc.secure_channel(f"127.0.0.1:{port}", credentials, options=options)
    CHANNELS.append(channel)
    return inference_pb2_grpc.PrivateInferenceStub(channel)


def _activation(layout: DeployLayout, model: str, rows: int, dtype: Any = np.float16) -> Any:
    """Chosen activations for ``model``'s back stage: ``rows`` rows of noise in ``dtype``."""
    (spec,) = read_manifest(layout.private.model(model)).inputs
    shape = [rows if isinstance(dim, DimSpec) else dim for dim in spec.shape]
    array = np.random.default_rng(rows).standard_normal(shape).astype(dtype)
    return spec.name, array


def _request(layout: DeployLayout, model: str, rows: int = ROWS, **extra: Any) -> Any:
    name, array = _activation(layout, model, rows, extra.pop("dtype", np.float16))
    if "poison" in extra:
        array.flat[3] = extra.pop("poison")
    datatype = {"f2": "FP16", "f4": "FP32", "f8": "FP64"}[array.dtype.str[1:]]
    tensor = inference_pb2.Tensor(
        name=name, datatype=datatype, shape=list(array.shape), data=array.tobytes()
    )
    return inference_pb2.InferRequest(
        model=model, inputs=[tensor], pairing_id=pairing_id(layout, model), **extra
    )


def _flood(stub: Any, request: Any, limit: int = 200) -> tuple[int, grpc.RpcError]:
    """Send ``request`` until it is refused: (answers obtained, the refusal)."""
    for answered in range(limit):
        try:
            stub.Infer(request, timeout=30)
        except grpc.RpcError as error:
            return answered, error
    raise AssertionError(f"{limit} calls and no refusal")


def _trailers(error: grpc.RpcError) -> dict[str, str]:
    metadata: Any = error.trailing_metadata()
    return {str(key): str(value) for key, value in metadata or ()}


@dataclass
class Stack:
    """A copy of the session deployment (digits models), one private tier with small budgets,
    public replica 1 (the default client certificate) and replica 2 (one of its own)."""

    layout: DeployLayout
    private: TierProcess
    replica_1: TierProcess
    replica_2: TierProcess
    key: str

    def stub(self, who: Identity) -> Any:
        return _stub(self.layout, self.private.port, who)

    @property
    def attacker(self) -> Identity:
        """What the attacker took from public replica 1's host."""
        return Identity.read(self.layout.public.tls)

    @property
    def second(self) -> Identity:
        return Identity.read(self.layout.public_replicas / "splitvault-public-2")

    def spend(self, who: Identity, model: str) -> int:
        """Flood ``model`` as ``who`` until refused; the samples answered."""
        answered, error = _flood(self.stub(who), _request(self.layout, model))
        assert error.code() == EXHAUSTED, error.details()
        return answered * ROWS


def _fresh_copy(deployment: Deployment, root: Path) -> DeployLayout:
    """A copy without MiniLM, its public state, or the session's admission counters."""
    layout = copy_deployment(
        deployment.layout, root, skip_models={"minilm", "nested"}, keep_public_state=False
    )
    shutil.rmtree(layout.private.state / "admission", ignore_errors=True)
    return layout


@pytest.fixture(scope="module")
def stack(deployment: Deployment, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    layout = _fresh_copy(deployment, tmp_path_factory.mktemp("padm") / "d")
    _, folder = add_public_replica(layout, load_ca(layout))
    key = issue_key(layout, "padm")
    private = start_private(layout.root, env=PRIVATE_ENV)
    tiers: list[TierProcess] = []
    try:
        tiers.append(start_public(layout.root, private.port, env=tier_env()))
        env_2 = {**tier_env(), "SPLITVAULT_PUBLIC_CLIENT_TLS_DIR": str(folder)}
        tiers.append(start_public(layout.root, private.port, env=env_2))
        yield Stack(layout, private, tiers[0], tiers[1], key)
    finally:
        for tier in tiers:
            tier.stop()
        private.stop()


def test_a_direct_flood_with_the_public_certificate_is_refused_after_the_budget(
    stack: Stack,
) -> None:
    answered, error = _flood(stack.stub(stack.attacker), _request(stack.layout, "digits"))
    assert answered * ROWS == UNSIGNED_BUDGET  # every sample counted, then refused
    assert error.code() == EXHAUSTED
    trailers = _trailers(error)
    assert trailers["splitvault-reason"] == "identity_budget"
    assert float(trailers["splitvault-retry-after-s"]) > 0
    (alert,) = stack.private.wait_for_events("private_budget_exhausted")
    assert (alert["identity"], alert["model"], alert["budget"], alert["limit"]) == (
        "splitvault-public-1",
        "digits",
        "unsigned",
        "daily",
    )
    metrics = httpx.get(stack.private.metrics_url, timeout=10).text
    refusals = (
        'splitvault_private_budget_refusals_total{budget="unsigned",'
        'identity="splitvault-public-1",model="digits"} 1.0'
    )
    assert refusals in metrics


def test_the_public_tier_answers_503_with_retry_after_once_its_identity_is_spent(
    stack: Stack, digits_model: DigitsFixture
) -> None:
    stack.spend(stack.attacker, "digits")  # the attacker's flood spends replica 1's budget
    with https(stack.layout, stack.replica_1.port, stack.key) as http:
        reply = http.post(
            "/v2/models/digits/infer", json=image_request(digits_model.data.test_x[:2])
        )
    assert reply.status_code == 503, reply.text  # a service fault, not the customer's 429
    assert int(reply.headers["retry-after"]) >= 1
    assert "budget" in reply.json()["error"]


def test_a_second_replica_identity_keeps_its_own_budget(
    stack: Stack, digits_model: DigitsFixture
) -> None:
    stack.spend(stack.attacker, "digits")
    reply = stack.stub(stack.second).Infer(_request(stack.layout, "digits"), timeout=30)
    assert len(reply.outputs) > 0
    body = image_request(digits_model.data.test_x[:2])
    with https(stack.layout, stack.replica_2.port, stack.key) as http:
        assert http.post("/v2/models/digits/infer", json=body).status_code == 200
    with https(stack.layout, stack.replica_1.port, stack.key) as http:
        assert http.post("/v2/models/digits/infer", json=body).status_code == 503


def test_a_key_over_its_private_budget_gets_429_for_that_key(
    stack: Stack, digits_model: DigitsFixture
) -> None:
    body = image_request(digits_model.data.test_x[:ROWS])
    statuses = []
    with https(stack.layout, stack.replica_2.port, stack.key) as http:
        for _ in range(KEY_BUDGET // ROWS + 1):
            reply = http.post("/v2/models/digits-label/infer", json=body)
            statuses.append(reply.status_code)
    assert statuses == [200] * (KEY_BUDGET // ROWS) + [429], reply.text
    assert int(reply.headers["retry-after"]) >= 1
    (alert,) = stack.private.wait_for_events("private_key_budget_exhausted")
    assert (alert["identity"], alert["model"]) == ("splitvault-public-2", "digits-label")


def test_the_older_single_public_identity_is_still_admitted(stack: Stack) -> None:
    legacy = issue_certificate(load_ca(stack.layout), PUBLIC_IDENTITY, server=False, client=True)
    stub = stack.stub(Identity(legacy.cert_pem(), legacy.key_pem()))
    assert stub.Infer(_request(stack.layout, "digits-label", dtype=np.float32), timeout=30).outputs


BAD_ACTIVATIONS: dict[str, tuple[dict[str, Any], str]] = {
    "nan": ({"poison": np.nan}, "holds NaN or infinite values"),
    "inf": ({"poison": np.inf}, "holds NaN or infinite values"),
    "minus-inf": ({"poison": -np.inf}, "holds NaN or infinite values"),
    "fp64": ({"dtype": np.float64}, "must have datatype FP16"),
    "fp32-for-fp16": ({"dtype": np.float32}, "must have datatype FP16"),
}


@pytest.mark.parametrize("case", BAD_ACTIVATIONS, ids=str)
def test_non_finite_and_wrong_dtype_activations_are_invalid(stack: Stack, case: str) -> None:
    changes, message = BAD_ACTIVATIONS[case]
    with pytest.raises(grpc.RpcError) as refused:
        stack.stub(stack.second).Infer(_request(stack.layout, "digits", **changes), timeout=30)
    assert refused.value.code() == INVALID
    (spec,) = read_manifest(stack.layout.private.model("digits")).inputs
    assert refused.value.details() == f"input {spec.name!r} {message}"


# --- a restart ----------------------------------------------------------------------------


def test_a_restart_keeps_the_daily_budget(
    deployment: Deployment, tmp_path_factory: pytest.TempPathFactory
) -> None:
    layout = _fresh_copy(deployment, tmp_path_factory.mktemp("padm-restart") / "d")
    attacker = Identity.read(layout.public.tls)
    first = start_private(layout.root, env=PRIVATE_ENV)
    try:
        answered, _ = _flood(_stub(layout, first.port, attacker), _request(layout, "digits"))
    finally:
        assert first.stop() == 0  # SIGTERM: drains, then saves the counters
    assert answered * ROWS == UNSIGNED_BUDGET
    again = start_private(layout.root, env=PRIVATE_ENV)
    try:
        (ready,) = again.wait_for_events("private_admission_ready")
        assert ready["restored_counters"] >= 2  # the identity's and its unsigned budget
        answered, error = _flood(_stub(layout, again.port, attacker), _request(layout, "digits"))
        assert (answered, error.code()) == (0, EXHAUSTED)
    finally:
        again.stop()


def test_unreadable_counters_refuse_the_start(
    deployment: Deployment, tmp_path_factory: pytest.TempPathFactory
) -> None:
    layout = _fresh_copy(deployment, tmp_path_factory.mktemp("padm-corrupt") / "d")
    counters = layout.private.state / "admission" / "counters.json"
    counters.parent.mkdir(mode=0o700, parents=True)
    counters.write_text("{not json")
    counters.chmod(0o600)
    command = [sys.executable, "-m", "splitvault", "serve", "private", "--deploy", str(layout.root)]
    env = {**os.environ, **PRIVATE_ENV, "SPLITVAULT_PRIVATE_PORT": "0"}
    env["SPLITVAULT_PRIVATE_METRICS_PORT"] = "0"
    done = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 1, done.stderr[-2000:]
    events = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    assert "admission_state_unreadable" in [event["event"] for event in events]
    assert "private_tier_listening" not in [event["event"] for event in events]


# --- batch isolation ----------------------------------------------------------------------


@pytest.fixture
def gated(deployment: Deployment, tmp_path: Path) -> Iterator[tuple[DeployLayout, Any]]:
    """An in-process private tier whose back-stage batches wait for the test's gate."""
    layout = _fresh_copy(deployment, tmp_path / "d")
    settings = PrivateSettings.load(
        layout.private_config,
        tier_dir=layout.private.root,
        kek_file=layout.kek,
        port=0,
        metrics_port=0,
        torch_threads=1,
        concurrent_batches=1,
        lock_memory=False,
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("private_core.server.ThreadPoolExecutor", GatedPool)
        patch.setattr("private_core.server.freeze_startup_objects", lambda: 0)
        tier = ThreadedPrivateTier(settings)
    try:
        yield layout, tier
    finally:
        tier.stop()


def test_a_bad_request_fails_alone_while_its_neighbours_share_a_batch(
    gated: tuple[DeployLayout, Any],
) -> None:
    layout, tier = gated
    server, pool = tier.server, tier.server.executor
    stub = _stub(layout, server.port, Identity.read(layout.public.tls))
    good = [_request(layout, "digits", rows) for rows in (2, 3)]
    alone = [stub.Infer(request, timeout=30) for request in good]  # answers of each alone
    with ThreadPoolExecutor(4) as clients, pool.holding() as handed:
        first = clients.submit(stub.Infer, _request(layout, "digits", 1), timeout=60)
        assert handed.acquire(timeout=60), "the first batch never reached the pool"
        neighbours = [clients.submit(stub.Infer, request, timeout=60) for request in good]
        poll(lambda: server.batcher.queued_rows("digits") == 5, "both neighbours queued")
        bad = _request(layout, "digits", 4, poison=np.nan)
        with pytest.raises(grpc.RpcError) as refused:
            stub.Infer(bad, timeout=60)  # answered while the batches are still held
        assert refused.value.code() == INVALID
        assert server.batcher.queued_rows("digits") == 5  # it never entered the batcher
        before = _batches(server)
    assert first.result().outputs
    for future, single in zip(neighbours, alone, strict=True):
        assert future.result().outputs == single.outputs
    after = _batches(server)
    # The held batch of one row, then both neighbours together in one batch of five.
    assert (after[0] - before[0], after[1] - before[1]) == (2, 1 + 5)


def _batches(server: Any) -> tuple[float, float]:
    """(batches, rows in them) the tier has run for digits."""
    registry, labels = server.metrics.registry, {"model": "digits"}
    count = registry.get_sample_value("splitvault_private_batch_size_count", labels) or 0.0
    return count, registry.get_sample_value("splitvault_private_batch_size_sum", labels) or 0.0
