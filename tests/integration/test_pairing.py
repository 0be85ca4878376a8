"""Re-pack, then restart one tier: the model is not ready (503, logged), never a client's 400.

Each test copies the session deployment (digits only), re-packs digits split after another
layer (its front now sends differently named activations) and restarts one tier against the
other's old pack, as an operator who forgot the other tier would. Restarting both heals it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from shared.keys import LocalFileKeyProvider
from shared.layout import DeployLayout
from shared.manifest import TopKPolicy, read_manifest
from splitvault.packing.pack import pack_spec
from tests.conftest import Deployment, DigitsFixture
from tests.support.deployments import copy_deployment
from tests.support.ports import ReservedPort
from tests.support.processes import TierProcess, start_public, start_tier
from tests.support.stack import https, image_request, poll, tier_env

pytestmark = pytest.mark.slow

OTHER_SPLIT = "features.3"  # after the second convolution's ReLU, not the first's
SKIP = ("minilm", "nested", "digits-label")
INFER = "/v2/models/digits/infer"


@pytest.fixture
def layout(deployment: Deployment, tmp_path: Path) -> DeployLayout:
    return copy_deployment(deployment.layout, tmp_path / "deploy", skip_models=SKIP)


@pytest.fixture
def started() -> Iterator[list[TierProcess]]:
    """Tier processes a test starts; each is stopped at the end, even on failure."""
    processes: list[TierProcess] = []
    yield processes
    for process in reversed(processes):
        process.stop()
        print("\n".join(process.lines[-30:]))  # shown by pytest only when a test failed


@pytest.fixture
def private_port() -> Iterator[ReservedPort]:
    with ReservedPort() as reserved:
        yield reserved


def _private(layout: DeployLayout, started: list[TierProcess], port: int) -> TierProcess:
    args = ["serve", "private", "--deploy", str(layout.root), "--port", str(port)]
    env = {**tier_env(), "SPLITVAULT_PRIVATE_METRICS_PORT": "0"}
    env["SPLITVAULT_PRIVATE_GRACE_PERIOD_S"] = "1"
    started.append(start_tier(args, "private_tier_listening", env=env))
    return started[-1]


def _public(layout: DeployLayout, started: list[TierProcess], private_port: int) -> TierProcess:
    started.append(start_public(layout.root, private_port, env=tier_env()))
    return started[-1]


def _repack(layout: DeployLayout, digits_model: DigitsFixture) -> None:
    provider = LocalFileKeyProvider.load(layout.kek)
    pack_spec(
        digits_model.spec,
        name="digits",
        split=OTHER_SPLIT,
        layout=layout,
        provider=provider,
        policy=TopKPolicy(k=3),
        show_progress=False,
    )


def _node_names(layout: DeployLayout) -> set[str]:
    """The internal tensor names the stages exchange (they must never reach a client)."""
    back = read_manifest(layout.private.model("digits"))
    front = read_manifest(layout.public.model("digits"))
    return {spec.name for spec in [*back.inputs, *front.outputs]}


def _assert_not_ready(http: httpx.Client, body: dict[str, object], names: set[str]) -> None:
    reply = http.post(INFER, json=body)
    assert reply.status_code == 503, reply.text
    error = reply.json()["error"]
    assert "not ready" in error and "different packs" in error
    assert not [name for name in names if name in error], error
    ready = http.get("/v2/models/digits/ready")
    assert ready.status_code == 503
    assert "different packs" in ready.json()["error"]
    assert http.get("/v2/health/ready").status_code == 503
    listed = http.get("/v2/models").json()["models"]
    assert [(m["name"], m["ready"]) for m in listed] == [("digits", False)]
    index = http.post("/v2/repository/index", json={}).json()
    assert [(m["name"], m["state"]) for m in index] == [("digits", "UNAVAILABLE")]
    assert http.post("/v2/repository/index", json={"ready": True}).json() == []


def test_repack_and_restart_of_the_private_tier_only(
    layout: DeployLayout,
    deployment: Deployment,
    digits_model: DigitsFixture,
    started: list[TierProcess],
    private_port: ReservedPort,
) -> None:
    old_names = _node_names(layout)
    private = _private(layout, started, private_port.port)
    public = _public(layout, started, private_port.port)
    body = image_request(digits_model.data.test_x[:2])
    with https(layout, public.port, deployment.api_key) as http:
        assert http.post(INFER, json=body).status_code == 200
        metadata = http.get("/v2/models/digits").json()
        assert "split" not in metadata["parameters"]
        assert not [name for name in old_names if name in str(metadata)]

        _repack(layout, digits_model)
        assert _node_names(layout) != old_names  # the stages now exchange other tensors
        private.stop()
        private = _private(layout, started, private_port.port)
        # The public tier's channel reconnects after the restart (backoff up to 2 s).
        poll(lambda: "unreachable" not in http.post(INFER, json=body).text, "reconnection")
        _assert_not_ready(http, body, old_names | _node_names(layout))

    (refused,) = private.wait_for_events("model_pairing_mismatch")
    assert refused["model"] == "digits" and "restart both tiers" in refused["reason"]
    (noticed,) = public.wait_for_events("model_pairing_mismatch")
    assert noticed["model"] == "digits"
    assert public.wait_for_events("model_sets_differ")[0]["models"]["digits"] == noticed["reason"]

    public.stop()  # restarting the other tier too serves the new pack
    public = _public(layout, started, private_port.port)
    with https(layout, public.port, deployment.api_key) as http:
        reply = http.post(INFER, json=body)
        assert reply.status_code == 200, reply.text
        assert http.get("/v2/health/ready").status_code == 200
        assert http.get("/v2/models").json()["models"][0]["ready"] is True
    assert not [e for e in public.events() if e.get("event") == "model_pairing_mismatch"]


def test_repack_and_restart_of_the_public_tier_only(
    layout: DeployLayout,
    deployment: Deployment,
    digits_model: DigitsFixture,
    started: list[TierProcess],
    private_port: ReservedPort,
) -> None:
    old_names = _node_names(layout)
    private = _private(layout, started, private_port.port)  # serves the old pack
    _repack(layout, digits_model)
    public = _public(layout, started, private_port.port)  # serves the new one
    # Checked at start, before any request.
    (noticed,) = public.wait_for_events("model_pairing_mismatch")
    assert noticed["model"] == "digits" and "different packs" in noticed["reason"]
    body = image_request(digits_model.data.test_x[:2])
    with https(layout, public.port, deployment.api_key) as http:
        _assert_not_ready(http, body, old_names | _node_names(layout))
    private.wait_for_events("model_pairing_mismatch")
