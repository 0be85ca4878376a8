"""Network separation, as compose's internal network promises, shown with Linux namespaces.

Three network namespaces joined by two veth links, and no forwarding anywhere::

    client 10.213.2.1 --frontend-- 10.213.2.2 public 10.213.1.1 --backend-- 10.213.1.2 private

The private tier listens on its backend address, the public tier on its frontend address. The
client's default route points at the public host, yet it cannot open a TCP connection to the
private gRPC port, while HTTPS inference through the public tier works. On the backend link a
TLS client without the public tier's certificate is refused by the private tier.

Needs root and ``ip netns`` (CI runs as root); skipped otherwise.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from shared.layout import PUBLIC_IDENTITY, DeployLayout
from splitvault.deploy import load_ca
from splitvault.launcher import TierProcess
from splitvault.pki import issue_certificate
from tests.conftest import Deployment, DigitsFixture
from tests.support.deployments import copy_deployment
from tests.support.netguard.sitecustomize import ALLOW_ENV
from tests.support.stack import image_request, tier_env

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
PUBLIC_BACK, PRIVATE_BACK = "10.213.1.1", "10.213.1.2"
CLIENT_FRONT, PUBLIC_FRONT = "10.213.2.1", "10.213.2.2"
PRIVATE_PORT, PUBLIC_PORT = 50051, 8443
ENV = {
    **tier_env(),
    "SPLITVAULT_PRIVATE_METRICS_PORT": "0",
    "SPLITVAULT_PUBLIC_METRICS_PORT": "0",
    "PYTHONUNBUFFERED": "1",
    # The connect guard lets the processes in these namespaces reach the namespaces' addresses.
    ALLOW_ENV: "10.213.0.0/16",
}


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


def _netns_unavailable() -> str | None:
    """Why this test cannot run here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root (CI runs the suite as root)"
    if shutil.which("ip") is None:
        return "the 'ip' command (iproute2) is not installed"
    probe = f"svprobe{os.getpid()}"
    result = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if result.returncode != 0:
        return f"'ip netns add' fails here: {result.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)
    return None


@dataclass(frozen=True)
class Namespaces:
    """The three namespace names."""

    client: str
    public: str
    private: str


def _link(name: str, a: str, a_ip: str, b: str, b_ip: str) -> None:
    """A veth pair from namespace ``a`` to ``b``, addressed on a /24 and up."""
    _ip("link", "add", f"{name}a", "netns", a, "type", "veth", "peer", f"{name}b", "netns", b)
    for ns, end, address in ((a, "a", a_ip), (b, "b", b_ip)):
        _ip("-n", ns, "addr", "add", f"{address}/24", "dev", f"{name}{end}")
        _ip("-n", ns, "link", "set", f"{name}{end}", "up")


@pytest.fixture
def namespaces() -> Iterator[Namespaces]:
    reason = _netns_unavailable()
    if reason is not None:
        pytest.skip(reason)
    tag = os.getpid()
    names = Namespaces(f"svc{tag}", f"svq{tag}", f"svp{tag}")
    made: list[str] = []
    try:
        for ns in (names.client, names.public, names.private):
            _ip("netns", "add", ns)
            made.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        _link(f"svf{tag}", names.client, CLIENT_FRONT, names.public, PUBLIC_FRONT)
        _link(f"svb{tag}", names.public, PUBLIC_BACK, names.private, PRIVATE_BACK)
        # The client sends everything to the public host; that host forwards nothing.
        _ip("-n", names.client, "route", "add", "default", "via", PUBLIC_FRONT)
        yield names
    finally:
        for ns in made:  # deleting a namespace deletes the veth ends inside it
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


def _start_in(
    ns: str, args: Sequence[str], port: int, ready_event: str, env: dict[str, str]
) -> TierProcess:
    """``python -m splitvault ARGS --port PORT`` inside ``ns``; returns once it logs
    ``ready_event``."""
    process = subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, "-m", "splitvault", *args, "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **ENV, **env},
        cwd=REPO,
    )
    lines: list[str] = []
    ready: queue.Queue[bool] = queue.Queue()

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line.rstrip("\n"))
            if f'"{ready_event}"' in line:
                ready.put(True)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    tier = TierProcess(process, port, lines, reader)
    try:
        ready.get(timeout=120)
    except queue.Empty:
        tier.stop()
        raise RuntimeError(
            f"{args[:2]} did not start in {ns}:\n" + "\n".join(lines[-30:])
        ) from None
    return tier


def _python_in(ns: str, script: str, *args: str) -> dict[str, object]:
    """Run ``script`` with ``args`` in ``ns``; it prints one JSON object."""
    result = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env={**os.environ, ALLOW_ENV: ENV[ALLOW_ENV]},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    found: dict[str, object] = json.loads(result.stdout.strip().splitlines()[-1])
    return found


CLIENT_SCRIPT = """
import json, socket, ssl, sys
import httpx
url, ca, key, body, private_host, private_port = sys.argv[1:]
context = ssl.create_default_context(cafile=ca)
reply = httpx.post(url + "/v2/models/digits/infer", content=body, verify=context, timeout=20,
                   headers={"Authorization": "Bearer " + key, "Content-Type": "application/json"})
try:
    socket.create_connection((private_host, int(private_port)), timeout=1.5).close()
    private = "connected"
except OSError as error:
    private = type(error).__name__
print(json.dumps({"status": reply.status_code, "outputs": reply.json().get("outputs"),
                  "private": private}))
"""

BACKEND_SCRIPT = """
import json, sys
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
address, ca, cert, key = sys.argv[1:]
def check(**identity):
    credentials = grpc.ssl_channel_credentials(root_certificates=open(ca, "rb").read(), **identity)
    options = [("grpc.ssl_target_name_override", "splitvault-private")]
    with grpc.secure_channel(address, credentials, options=options) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                              timeout=5)
        except grpc.RpcError as error:
            return error.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
print(json.dumps({
    "without_certificate": check(),
    "with_public_certificate": check(private_key=open(key, "rb").read(),
                                     certificate_chain=open(cert, "rb").read()),
}))
"""


def _frontend_certificate(layout: DeployLayout) -> None:
    """The public tier's HTTPS certificate, for the address clients dial."""
    pair = issue_certificate(
        load_ca(layout), PUBLIC_IDENTITY, ip_addresses=[PUBLIC_FRONT], server=True, client=False
    )
    pair.write(layout.public.tls / "server.crt", layout.public.tls / "server.key")


def test_client_reaches_only_the_public_tier(
    namespaces: Namespaces, deployment: Deployment, digits_model: DigitsFixture, tmp_path: Path
) -> None:
    layout = copy_deployment(deployment.layout, tmp_path / "deploy")
    _frontend_certificate(layout)
    root = str(layout.root)
    private_args = ["serve", "private", "--deploy", root, "--host", PRIVATE_BACK]
    private = _start_in(
        namespaces.private, private_args, PRIVATE_PORT, "private_tier_listening", {}
    )
    tiers = [private]
    try:
        public_args = ["serve", "public", "--deploy", root, "--host", PUBLIC_FRONT]
        public_args += ["--private", f"{PRIVATE_BACK}:{PRIVATE_PORT}"]
        tiers.append(
            _start_in(namespaces.public, public_args, PUBLIC_PORT, "public_tier_ready", {})
        )
        body = json.dumps(image_request(digits_model.data.test_x[:2]))
        client = _python_in(
            namespaces.client,
            CLIENT_SCRIPT,
            f"https://{PUBLIC_FRONT}:{PUBLIC_PORT}",
            str(layout.public.ca_cert),
            deployment.api_key,
            body,
            PRIVATE_BACK,
            str(PRIVATE_PORT),
        )
        tls = layout.public.tls
        backend = _python_in(
            namespaces.public,
            BACKEND_SCRIPT,
            f"{PRIVATE_BACK}:{PRIVATE_PORT}",
            str(tls / "ca.crt"),
            str(tls / "client.crt"),
            str(tls / "client.key"),
        )
    finally:
        for tier in reversed(tiers):
            tier.stop()
    logs = "\n".join(tiers[-1].lines[-20:])
    assert client["status"] == 200, (client, logs)
    outputs = client["outputs"]
    assert isinstance(outputs, list) and outputs[0]["shape"] == [2, 3]
    assert client["private"] in {"TimeoutError", "OSError"}, client
    assert backend == {"without_certificate": "UNAVAILABLE", "with_public_certificate": "SERVING"}
