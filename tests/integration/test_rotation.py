"""Key and certificate rotation against real tiers.

* After ``keys rotate-kek`` the private tier loads every model with the new KEK and none with
  the old one.
* ``certs rotate`` then a rolling restart: two private replicas behind one public tier; replica
  A is restarted (it then presents the new certificate) while B keeps the old one, and the
  public tier answers every request throughout, through B alone and then through both. The
  public tier restarted with its new certificates reaches both replicas.
* Certificates that expire soon (the rotation issues 10-day ones here) are reported by each tier
  with a ``certificate_expiring`` log event at startup. Expired and not-yet-valid client
  certificates are refused by the private tier: see ``test_mtls.py``.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from prometheus_client.parser import text_string_to_metric_families

from shared.layout import PRIVATE_IDENTITY, DeployLayout
from splitvault.cli import main
from tests.conftest import Deployment, DigitsFixture
from tests.support.deployments import copy_deployment
from tests.support.ports import ReservedPort
from tests.support.processes import TierProcess, start_public, start_tier, wait_for
from tests.support.stack import image_request, tier_env

pytestmark = pytest.mark.slow

MODELS = ["digits", "digits-label", "nested"]


@pytest.fixture
def layout(deployment: Deployment, tmp_path: Path) -> DeployLayout:
    return copy_deployment(deployment.layout, tmp_path / "deploy")


@pytest.fixture
def started() -> Iterator[list[TierProcess]]:
    """Tier processes a test starts; each is stopped at the end, even on failure."""
    processes: list[TierProcess] = []
    yield processes
    for process in reversed(processes):
        process.stop()


def _private(
    layout: DeployLayout,
    started: list[TierProcess],
    port: int = 0,
    kek: Path | None = None,
    state: str = "state",
) -> TierProcess:
    """A private tier; ``state``: its state folder in the private folder (tiers running at
    once each need their own: a tier locks its folder)."""
    args = ["serve", "private", "--deploy", str(layout.root), "--port", str(port)]
    args += ["--kek-file", str(kek)] if kek else []
    env = {**tier_env(), "SPLITVAULT_PRIVATE_METRICS_PORT": "0"}
    env["SPLITVAULT_PRIVATE_STATE_DIR"] = str(layout.private.root / state)
    env["SPLITVAULT_PRIVATE_GRACE_PERIOD_S"] = "2"
    started.append(start_tier(args, "private_tier_listening", env=env))
    return started[-1]


def _event(process: TierProcess, name: str) -> dict[str, Any]:
    return next(e for e in process.events() if e.get("event") == name)


def test_private_tier_opens_the_models_with_the_new_kek_only(
    layout: DeployLayout, started: list[TierProcess], tmp_path: Path
) -> None:
    old_kek = tmp_path / "old-kek"
    shutil.copy(layout.kek, old_kek)
    assert main(["keys", "rotate-kek", "--deploy", str(layout.root)]) == 0
    new = _private(layout, started)
    listening = _event(new, "private_tier_listening")
    assert (listening["models"], listening["failed"]) == (MODELS, [])
    old = _private(layout, started, kek=old_kek, state="state-old")
    listening = _event(old, "private_tier_listening")
    assert (listening["models"], listening["failed"]) == ([], MODELS)


class Load:
    """Sends one inference request every ``interval_s`` from a thread; keeps every status."""

    def __init__(self, url: str, deployment: Deployment, body: dict[str, Any]) -> None:
        context = ssl.create_default_context(cafile=str(deployment.ca_cert))
        self._http = httpx.Client(
            base_url=url, verify=context, headers=deployment.auth_headers, timeout=10
        )
        self._body = body
        self._stop = threading.Event()
        self.results: list[tuple[float, int | str]] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            try:
                status: int | str = self._http.post(
                    "/v2/models/digits/infer", json=self._body
                ).status_code
            except httpx.HTTPError as error:
                status = repr(error)
            self.results.append((time.monotonic(), status))

    def served_since(self, since: float) -> int:
        return sum(1 for at, status in list(self.results) if at > since and status == 200)

    def stop(self) -> list[tuple[float, int | str]]:
        self._stop.set()
        self._thread.join(15)
        self._http.close()
        return self.results


def _served(process: TierProcess) -> float:
    """Inference calls a private replica answered OK (its metrics endpoint)."""
    port = _event(process, "private_tier_listening")["metrics_port"]
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "splitvault_private_requests_total" and sample.labels == {
                "model": "digits",
                "code": "OK",
            }:
                return sample.value
    return 0.0


def _presented(
    port: int, ca: Path, server_name: str, client: tuple[Path, Path] | None = None
) -> bytes:
    """The DER certificate a TLS server presents on ``127.0.0.1:port``."""
    context = ssl.create_default_context(cafile=str(ca))
    context.set_alpn_protocols(["h2"])
    if client is not None:
        context.load_cert_chain(*client)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=server_name) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def _der(path: Path) -> bytes:
    return x509.load_pem_x509_certificate(path.read_bytes()).public_bytes(
        serialization.Encoding.DER
    )


def _expiring(process: TierProcess) -> dict[str, dict[str, Any]]:
    """``certificate_expiring`` events by certificate file name."""
    events = process.events()
    return {Path(e["path"]).name: e for e in events if e.get("event") == "certificate_expiring"}


def _restart_private(
    old: TierProcess, layout: DeployLayout, started: list[TierProcess], load: Load
) -> TierProcess:
    """Stop a replica, check the other one serves alone, start it again on the same port."""
    old.stop()
    stopped = time.monotonic()
    wait_for(lambda: load.served_since(stopped) >= 20, timeout=30, what="serving on one replica")
    return _private(layout, started, port=old.port)


@pytest.fixture
def replica_ports() -> Iterator[tuple[int, int]]:
    """Two private addresses, held by the test: a replica restarts on its own."""
    with ReservedPort() as first, ReservedPort() as second:
        yield first.port, second.port


def test_rolling_certificate_rotation_keeps_serving(
    layout: DeployLayout,
    deployment: Deployment,
    digits_model: DigitsFixture,
    started: list[TierProcess],
    replica_ports: tuple[int, int],
) -> None:
    a, b = (
        _private(layout, started, port=port, state=state)
        for port, state in zip(replica_ports, ("state", "state-b"), strict=True)
    )
    env = tier_env()
    extra = ["--private", f"127.0.0.1:{b.port}"]
    public = start_public(layout.root, a.port, env=env, extra=extra)
    started.append(public)
    body = image_request(digits_model.data.test_x[:1])
    load = Load(f"https://localhost:{public.port}", deployment, body)
    try:
        wait_for(lambda: _served(a) > 0 and _served(b) > 0, timeout=30, what="both replicas")
        assert not (_expiring(a) or _expiring(b) or _expiring(public))

        assert main(["certs", "rotate", "--deploy", str(layout.root), "--valid-days", "10"]) == 0
        tls = layout.private.tls
        ca, own = tls / "ca.crt", (tls / "server.crt", tls / "server.key")
        a = _restart_private(a, layout, started, load)
        assert _presented(a.port, ca, PRIVATE_IDENTITY, own) == _der(tls / "server.crt")
        assert _presented(b.port, ca, PRIVATE_IDENTITY, own) != _der(tls / "server.crt")
        wait_for(lambda: _served(a) > 0, timeout=30, what="the restarted replica A serving")
    finally:
        results = load.stop()
    failures = [(at, status) for at, status in results if status != 200]
    assert not failures, failures[:5]
    assert len(results) > 60
    wait_for(lambda: "server.crt" in _expiring(a), timeout=10, what="A's expiry warning")
    assert 9 < _expiring(a)["server.crt"]["days_left"] <= 10

    public.stop()
    public = start_public(layout.root, a.port, env=env, extra=extra)
    started.append(public)
    pub_tls = layout.public.tls
    assert _presented(public.port, pub_tls / "ca.crt", "localhost") == _der(pub_tls / "server.crt")
    with httpx.Client(
        base_url=f"https://localhost:{public.port}",
        verify=ssl.create_default_context(cafile=str(pub_tls / "ca.crt")),
        headers=deployment.auth_headers,
    ) as http:
        before = _served(a) + _served(b)
        statuses = {http.post("/v2/models/digits/infer", json=body).status_code for _ in range(6)}
    assert statuses == {200}
    assert _served(a) + _served(b) == before + 6
    warned = _expiring(public)
    client = x509.load_pem_x509_certificate((pub_tls / "client.crt").read_bytes())
    assert warned["client.crt"]["serial"] == format(client.serial_number, "x")
    assert "server.crt" in warned
