"""The public tier with no private tier behind it: live, not ready, fast 503s, and recovery."""

from __future__ import annotations

import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import Deployment
from tests.support.ports import ReservedPort
from tests.support.processes import TierProcess, start_public, start_tier
from tests.support.stack import tier_env

pytestmark = pytest.mark.slow

TIMEOUT_S = 2.0
INFER = "/v2/models/digits/infer"
BODY = {
    "inputs": [{"name": "image", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.0] * 64}]
}


@pytest.fixture(scope="module")
def private_port() -> Iterator[int]:
    """The private tier's address, held by the test while no private tier runs there."""
    with ReservedPort() as reserved:
        yield reserved.port


@pytest.fixture(scope="module")
def public(deployment: Deployment, private_port: int) -> Iterator[TierProcess]:
    env = {**tier_env(), "SPLITVAULT_PUBLIC_REQUEST_TIMEOUT_S": str(TIMEOUT_S)}
    tier = start_public(deployment.root, private_port, env=env)
    yield tier
    tier.stop()
    print("\n".join(tier.lines[-60:]))  # shown by pytest only when a test failed


@pytest.fixture
def http(deployment: Deployment, public: TierProcess) -> Iterator[httpx.Client]:
    context = ssl.create_default_context(cafile=str(deployment.ca_cert))
    with httpx.Client(
        base_url=f"https://localhost:{public.port}",
        verify=context,
        timeout=30.0,
        headers=deployment.auth_headers,
    ) as client:
        yield client


def _assert_unavailable(http: httpx.Client) -> None:
    """Infer answers 503 with Retry-After and an error, within the deadline plus slack."""
    started = time.monotonic()
    reply = http.post(INFER, json=BODY)
    elapsed = time.monotonic() - started
    assert reply.status_code == 503, reply.text
    assert int(reply.headers["retry-after"]) >= 1
    assert "private tier" in reply.json()["error"]
    # Within the request deadline plus a loaded machine's slack; a hang would last the client's
    # 30 s timeout.
    assert elapsed < TIMEOUT_S + 5, f"infer took {elapsed:.1f}s with the private tier down"


def _poll(http: httpx.Client, path: str, *, timeout_s: float, body: object = None) -> int:
    """Poll until ``path`` answers 200; return the last status."""
    deadline = time.monotonic() + timeout_s
    status = 0
    while time.monotonic() < deadline:
        reply = http.post(path, json=body) if body is not None else http.get(path)
        status = reply.status_code
        if status == 200:
            break
        assert status == 503, reply.text
        time.sleep(0.25)
    return status


def test_no_private_tier_is_live_not_ready_and_fails_fast(http: httpx.Client) -> None:
    assert http.get("/v2/health/live").status_code == 200
    ready = http.get("/v2/health/ready")
    assert ready.status_code == 503
    assert int(ready.headers["retry-after"]) >= 1
    for _ in range(3):
        _assert_unavailable(http)
    model_ready = http.get("/v2/models/digits/ready")
    assert model_ready.status_code == 503
    assert "retry-after" in model_ready.headers


def test_public_tier_recovers_when_private_starts_and_fails_fast_when_it_stops(
    http: httpx.Client, deployment: Deployment, private_port: int, tmp_path: Path
) -> None:
    _assert_unavailable(http)
    # The session's private tier holds the deployment's state folder (a tier locks it),
    # so this second tier keeps its budgets and nonces in a folder of its own.
    private = start_tier(
        ["serve", "private", "--deploy", str(deployment.root), "--port", str(private_port)],
        "private_tier_listening",
        env={**tier_env(), "SPLITVAULT_PRIVATE_STATE_DIR": str(tmp_path / "state")},
    )
    try:
        assert private.port == private_port
        assert _poll(http, "/v2/health/ready", timeout_s=15) == 200
        assert _poll(http, INFER, timeout_s=15, body=BODY) == 200
        assert http.get("/v2/models/digits/ready").status_code == 200
    finally:
        private.stop()
        print("\n".join(private.lines[-60:]))  # shown by pytest only when the test failed
    _assert_unavailable(http)
    assert http.get("/v2/health/ready").status_code == 503
    assert http.get("/v2/health/live").status_code == 200
