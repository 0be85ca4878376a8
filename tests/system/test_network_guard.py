"""The test run cannot reach past this machine: the connect guard in every Python process, and,
when root, a network namespace of the run's own that holds native code too.

The refused target is an address beside the range the project's namespace tests give their own
namespaces (``tests/system/test_netns.py``), held by no interface or namespace. A
connect is only attempted inside the run's own network namespace (loopback only), so nothing
can leave the machine even if the guard failed; each check also shows that nothing was sent.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from tests.support.isolation import in_own_netns, interfaces, routes
from tests.support.netguard.sitecustomize import ALLOW_ENV, is_allowed

OFF_MACHINE = "10.214.255.254"
REPO = Path(__file__).resolve().parents[2]
PROBE = f"""
import socket
try:
    socket.create_connection(({OFF_MACHINE!r}, 6379), timeout=5)
except OSError as error:
    print(type(error).__name__, error)
"""


def _out_no_routes() -> int:
    """The kernel's count of IPv4 packets dropped for want of a route (``/proc/net/snmp``)."""
    lines = [line.split() for line in Path("/proc/self/net/snmp").read_text().splitlines()]
    header, values = (line for line in lines if line[0] == "Ip:")
    return int(values[header.index("OutNoRoutes")])


def _transmitted() -> dict[str, int]:
    """Packets sent so far by each interface of this namespace but ``lo``."""
    sent = {}
    for line in Path("/proc/self/net/dev").read_text().splitlines()[2:]:
        name, counters = line.split(":", 1)
        if name.strip() != "lo":
            sent[name.strip()] = int(counters.split()[9])
    return sent


OWN_NETNS_ONLY = pytest.mark.skipif(
    not in_own_netns(), reason="connects are tried only inside the run's own network namespace"
)


@OWN_NETNS_ONLY
def test_guard_allows_loopback_and_refuses_the_rest() -> None:
    assert is_allowed("127.0.0.1") and is_allowed("::1") and is_allowed("localhost")
    assert not is_allowed(OFF_MACHINE) and not is_allowed("10.213.1.1")
    with socket.socket() as server, socket.socket() as client:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        client.connect(server.getsockname())
    with socket.socket() as client, pytest.raises(PermissionError, match="netguard"):
        client.connect((OFF_MACHINE, 6379))
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with udp, pytest.raises(PermissionError, match="netguard"):
        udp.sendto(b"x", (OFF_MACHINE, 53))


@OWN_NETNS_ONLY
def test_guard_is_in_every_python_subprocess() -> None:
    result = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.startswith("OffMachineConnection"), result.stdout + result.stderr


def test_allow_list_admits_only_the_networks_a_test_made(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ALLOW_ENV, "10.213.0.0/16")
    assert is_allowed("10.213.1.2")
    assert not is_allowed("10.214.1.2") and not is_allowed(OFF_MACHINE)


@OWN_NETNS_ONLY
def test_native_code_has_no_route_off_the_machine() -> None:
    """gRPC's core and a shell do not use Python's socket module: the namespace stops them."""
    assert interfaces() == ["lo"] and routes() == []
    sent_before, dropped_before = _transmitted(), _out_no_routes()
    channel = grpc.insecure_channel(f"{OFF_MACHINE}:6379")
    with channel, pytest.raises(grpc.FutureTimeoutError):
        grpc.channel_ready_future(channel).result(timeout=3)
    shell = subprocess.run(
        ["bash", "-c", f"exec 3<>/dev/tcp/{OFF_MACHINE}/6379"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": ""},
        check=False,
    )
    assert shell.returncode != 0 and "unreachable" in shell.stderr, shell.stderr
    # Every attempt was dropped by the kernel for want of a route; no interface sent anything.
    assert _out_no_routes() > dropped_before
    assert _transmitted() == sent_before == {}
