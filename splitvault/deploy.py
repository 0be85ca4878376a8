"""``splitvault init``: a deployment folder laid out by tier, with a private CA and a KEK.

Each public replica has a client certificate of its own (CN ``splitvault-public-N``), so the
private tier's budgets bound what one compromised replica can ask: the first's is
``public/tls/client.*``, the others' are in ``public-replicas/NAME/`` (``add_public_replica``).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import NameOID

from shared.keys import LocalFileKeyProvider
from shared.layout import PRIVATE_IDENTITY, PUBLIC_IDENTITY, PUBLIC_REPLICA_PREFIX, DeployLayout
from splitvault.pki import CertKeyPair, create_ca, issue_certificate, write_ca_cert_only

_LOOPBACK_IPS = ("127.0.0.1", "::1")
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_PUBLIC_TOML = """\
# Public tier settings; SPLITVAULT_PUBLIC_* environment variables override them.
# host = "0.0.0.0"
# port = 8443
# state_dir = "/state/public"   # writable (keys, terms, audit); default: state/ beside this file
# private_addresses = ["private:50051"]
# request_timeout_s = 5.0
# max_body_bytes = 16777216
#
# [protection]
# terms_version = "1"            # bump when terms.md changes: keys must accept again
# rate_limit_backend = "memory"  # or "redis" with redis_url, for several public replicas
# redis_url = "redis://redis:6379/0"
# monitor_action = "block"       # record | alert | throttle | block
# [protection.key_limits]       # in samples (rows of a request's batch), not requests
# rate_per_s = 20.0
# burst = 128                    # at least the largest batch a model accepts
# daily_quota = 20000
"""
_TERMS = """\
# Terms of service (placeholder: replace with your own, then bump protection.terms_version)

1. You may use this API only to obtain predictions for your own use.
2. You must not use the answers to train, distil or otherwise reproduce the model.
3. Every query is recorded, with your API key and address, as evidence of use.
"""
_PRIVATE_TOML = """\
# Private tier settings; SPLITVAULT_PRIVATE_* environment variables override them.
# The KEK is not stored here: it comes from a secret file (kek_file or /run/secrets/kek).
# host = "0.0.0.0"
# port = 50051
# state_dir = "/state/private"  # writable (trigger log, admission counters); default: state/ here
# allowed_identities = ["splitvault-public"]           # CNs admitted by name (older deployments)
# allowed_identity_prefixes = ["splitvault-public-"]   # and by prefix: one CN per public replica
#
# [admission]                    # budgets in samples, per model, per private replica
# [admission.identity]           # per public replica's certificate identity
# rate_per_s = 2000.0
# burst = 8192
# daily_budget = 5000000
# [admission.unsigned]           # the part of it no customer signed (today: all of it)
# rate_per_s = 1000.0
# burst = 4096
# daily_budget = 2000000
# [admission.key]                # per API key id the public tier names (second line only)
# rate_per_s = 1000.0
# burst = 4096
# daily_budget = 1000000
"""


def init_deployment(
    root: Path,
    *,
    public_hosts: Sequence[str] = (),
    private_hosts: Sequence[str] = (),
    public_replicas: int = 1,
) -> DeployLayout:
    """Create the CA, the tier certificates (a client identity per public replica), the KEK
    and the empty tier folders."""
    if public_replicas < 1:
        raise ValueError("a deployment needs at least one public replica")
    layout = DeployLayout(root)
    if layout.ca.exists() or layout.kek.exists():
        raise FileExistsError(f"{root} already holds a deployment; refusing to overwrite its keys")
    ca = create_ca()
    ca.write(layout.ca / "ca.crt", layout.ca / "ca.key")
    LocalFileKeyProvider.create(layout.kek)
    _issue_tier_certificates(layout, ca, public_hosts, private_hosts)
    for _ in range(public_replicas - 1):
        add_public_replica(layout, ca)
    for tier in (layout.public, layout.private):
        tier.models.mkdir(parents=True, exist_ok=True)
    layout.public_config.write_text(_PUBLIC_TOML, encoding="utf-8")
    (layout.public.root / "terms.md").write_text(_TERMS, encoding="utf-8")
    layout.private_config.write_text(_PRIVATE_TOML, encoding="utf-8")
    return layout


def _issue_tier_certificates(
    layout: DeployLayout, ca: CertKeyPair, public_hosts: Sequence[str], private_hosts: Sequence[str]
) -> None:
    public_dns, public_ips = host_names(public_hosts)
    public_server = issue_certificate(
        ca,
        PUBLIC_IDENTITY,
        dns_names=["localhost", "public", *public_dns],
        ip_addresses=[*_LOOPBACK_IPS, *public_ips],
        server=True,
        client=False,
    )
    public_client = _replica_certificate(ca, replica_identity(1))
    private_dns, private_ips = host_names(private_hosts)
    private_server = issue_certificate(
        ca,
        PRIVATE_IDENTITY,
        dns_names=[PRIVATE_IDENTITY, "private", "localhost", *private_dns],
        ip_addresses=[*_LOOPBACK_IPS, *private_ips],
        server=True,
        client=True,
    )
    public_server.write(layout.public.tls / "server.crt", layout.public.tls / "server.key")
    public_client.write(layout.public.tls / "client.crt", layout.public.tls / "client.key")
    private_server.write(layout.private.tls / "server.crt", layout.private.tls / "server.key")
    write_ca_cert_only(ca, layout.public.ca_cert)
    write_ca_cert_only(ca, layout.private.ca_cert)


def host_names(hosts: Sequence[str]) -> tuple[list[str], list[str]]:
    """``--public-host``/``--private-host`` values split into DNS names and IP addresses: a
    client checks an IP address only against the certificate's IP entries."""
    dns_names: list[str] = []
    ip_addresses: list[str] = []
    for host in hosts:
        try:
            address = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            dns_names.append(host)
            continue
        if str(address) not in _LOOPBACK_IPS:
            ip_addresses.append(str(address))
    return dns_names, ip_addresses


def replica_identity(number: int) -> str:
    """The client CN of public replica ``number`` (from 1)."""
    return f"{PUBLIC_REPLICA_PREFIX}{number}"


def _replica_certificate(ca: CertKeyPair, identity: str, valid_days: int = 397) -> CertKeyPair:
    return issue_certificate(ca, identity, server=False, client=True, valid_days=valid_days)


def public_client_identities(layout: DeployLayout) -> dict[str, Path]:
    """Every public client identity of the deployment -> the folder of its certificate."""
    folders = [layout.public.tls]
    if layout.public_replicas.is_dir():
        folders += sorted(path for path in layout.public_replicas.iterdir() if path.is_dir())
    found = {}
    for folder in folders:
        if (folder / "client.crt").is_file():
            cert = x509.load_pem_x509_certificate((folder / "client.crt").read_bytes())
            names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
            found[str(names[0].value) if names else folder.name] = folder
    return found


def add_public_replica(
    layout: DeployLayout, ca: CertKeyPair, name: str | None = None, *, valid_days: int = 397
) -> tuple[str, Path]:
    """Issue a client certificate for one more public replica into ``public-replicas/NAME``.

    ``name`` defaults to the next ``splitvault-public-N``; a name must carry the prefix the
    private tier admits by default (``splitvault-public-``) or be added to its settings.
    Returns the identity and the folder holding ``client.crt`` and ``client.key``.
    """
    existing = public_client_identities(layout)
    if name is None:
        numbers = [
            int(cn.removeprefix(PUBLIC_REPLICA_PREFIX))
            for cn in existing
            if cn.removeprefix(PUBLIC_REPLICA_PREFIX).isdigit()
        ]
        name = replica_identity(max(numbers, default=0) + 1)
    if not _SAFE_NAME.fullmatch(name):
        raise ValueError(f"replica name {name!r}: use letters, digits, '.', '_' and '-' only")
    if name in existing or (layout.public_replicas / name).exists():
        raise FileExistsError(f"public identity {name!r} already exists")
    folder = layout.public_replicas / name
    pair = _replica_certificate(ca, name, valid_days)
    pair.write(folder / "client.crt", folder / "client.key")
    return name, folder


def load_ca(layout: DeployLayout) -> CertKeyPair:
    """The deployment's CA (for issuing more certificates)."""
    return CertKeyPair.load(layout.ca / "ca.crt", layout.ca / "ca.key")
