"""A connect guard for every Python process the tests start: loopback only.

``scripts/test.sh`` (and ``tests/conftest.py``, for a bare ``pytest``) put this folder on
``PYTHONPATH``, so Python imports this module at start-up in the test runner and in every
Python subprocess it starts (tiers, workers, ``ip netns exec`` children). It refuses, before
any packet is sent, a ``connect``, ``connect_ex`` or ``sendto`` whose destination is not a
loopback address, nor inside a network listed in ``SPLITVAULT_NETGUARD_ALLOW`` (comma-separated
CIDRs: the addresses of network namespaces or containers a test made itself).

It guards only what goes through Python's ``socket`` module. gRPC's native core, redis-server
and other programs are held by the stronger layer: when root, ``scripts/test.sh`` runs the
suite in a network namespace of its own whose only interface is ``lo``.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
from typing import Any

ALLOW_ENV = "SPLITVAULT_NETGUARD_ALLOW"
INSTALLED_ENV = "SPLITVAULT_NETGUARD"
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class OffMachineConnection(PermissionError):
    """A test tried to reach an address that is not loopback nor allowed."""


def _allowed_networks() -> list[Network]:
    """Loopback, the unspecified addresses (Linux routes them to this host) and the allow-list."""
    cidrs = ["127.0.0.0/8", "::1/128", "0.0.0.0/32", "::/128", "::ffff:127.0.0.0/104"]
    cidrs += [c.strip() for c in os.environ.get(ALLOW_ENV, "").split(",") if c.strip()]
    return [ipaddress.ip_network(cidr, strict=False) for cidr in cidrs]


def is_allowed(host: str) -> bool:
    """True if every address ``host`` names (an IP literal or a name) may be sent traffic."""
    networks = _allowed_networks()
    try:
        addresses = {ipaddress.ip_address(host.split("%", 1)[0])}
    except ValueError:
        try:
            infos = socket.getaddrinfo(host, None)
        except OSError:
            return True  # an unresolvable name sends nothing: connect fails on its own
        addresses = {ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos}
    return all(any(address in network for network in networks) for address in addresses)


def _check(sock: socket.socket, address: Any) -> None:
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or not isinstance(address, tuple):
        return
    host = str(address[0])
    if not is_allowed(host):
        raise OffMachineConnection(
            errno.EACCES,
            f"netguard: tests may only reach loopback (or {ALLOW_ENV}); refused {host!r}",
        )


def install() -> None:
    """Wrap ``socket.socket``'s connect, connect_ex and sendto with the check (once)."""
    if getattr(socket.socket, "_splitvault_netguard", False):
        return
    original_connect = socket.socket.connect
    original_connect_ex = socket.socket.connect_ex
    original_sendto = socket.socket.sendto

    def connect(self: socket.socket, address: Any) -> None:
        _check(self, address)
        original_connect(self, address)

    def connect_ex(self: socket.socket, address: Any) -> int:
        _check(self, address)
        return original_connect_ex(self, address)

    def sendto(self: socket.socket, data: Any, *args: Any) -> int:
        _check(self, args[-1])
        return original_sendto(self, data, *args)

    for name, method in (("connect", connect), ("connect_ex", connect_ex), ("sendto", sendto)):
        setattr(socket.socket, name, method)
    socket.socket._splitvault_netguard = True  # type: ignore[attr-defined]
    os.environ[INSTALLED_ENV] = "1"


install()
