"""``splitvault init --public-host``: the names and addresses clients use are in the certificate."""

from __future__ import annotations

import ipaddress
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509

from shared.layout import DeployLayout
from splitvault.deploy import host_names
from tests.support.stack import REPO_ROOT


def _handshake(layout: DeployLayout, server_hostname: str) -> None:
    """A real TLS handshake in memory: a client that trusts the deployment's CA and checks
    ``server_hostname`` against the public tier's server certificate."""
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls = layout.public.tls
    server_context.load_cert_chain(tls / "server.crt", tls / "server.key")
    client_context = ssl.create_default_context(cafile=str(layout.public.ca_cert))
    pipes = [(ssl.MemoryBIO(), ssl.MemoryBIO()) for _ in range(2)]  # (incoming, outgoing)
    client = client_context.wrap_bio(*pipes[0], server_hostname=server_hostname)
    server = server_context.wrap_bio(*pipes[1], server_side=True)
    done = {id(client): False, id(server): False}
    for _ in range(10):
        for side in (client, server):
            if not done[id(side)]:
                try:
                    side.do_handshake()
                    done[id(side)] = True
                except ssl.SSLWantReadError:
                    pass
        pipes[1][0].write(pipes[0][1].read())  # client -> server
        pipes[0][0].write(pipes[1][1].read())  # server -> client
        if all(done.values()):
            return
    raise AssertionError("the handshake did not finish")


def test_init_puts_public_hosts_in_the_server_certificate(tmp_path: Path) -> None:
    root = tmp_path / "deploy"
    hosts = ["api.example.com", "203.0.113.7", "[2001:db8::1]"]
    command = [sys.executable, "-m", "splitvault", "init", str(root)]
    for host in hosts:
        command += ["--public-host", host]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    layout = DeployLayout(root)
    cert = x509.load_pem_x509_certificate((layout.public.tls / "server.crt").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "public", "api.example.com"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address(ip) for ip in ("127.0.0.1", "::1", "203.0.113.7", "2001:db8::1")
    }
    for name in ("api.example.com", "203.0.113.7", "2001:db8::1", "localhost", "127.0.0.1"):
        _handshake(layout, name)
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
        _handshake(layout, "198.51.100.1")


def test_host_names_split_dns_names_from_addresses() -> None:
    assert host_names(["a.example", "10.0.0.5", "::1", "[fe80::1]", "127.0.0.1"]) == (
        ["a.example"],
        ["10.0.0.5", "fe80::1"],
    )
