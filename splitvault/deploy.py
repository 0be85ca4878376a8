"""``splitvault init``: a deployment folder laid out by tier, with a private CA and a KEK."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from shared.keys import LocalFileKeyProvider
from shared.layout import PRIVATE_IDENTITY, PUBLIC_IDENTITY, DeployLayout
from splitvault.pki import CertKeyPair, create_ca, issue_certificate, write_ca_cert_only

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
# state_dir = "/state/private"  # writable (watermark trigger log); default: state/ beside this file
# allowed_identities = ["splitvault-public"]
"""


def init_deployment(
    root: Path,
    *,
    public_hosts: Sequence[str] = (),
    private_hosts: Sequence[str] = (),
) -> DeployLayout:
    """Create the CA, the tier certificates, the KEK and the empty tier folders."""
    layout = DeployLayout(root)
    if layout.ca.exists() or layout.kek.exists():
        raise FileExistsError(f"{root} already holds a deployment; refusing to overwrite its keys")
    ca = create_ca()
    ca.write(layout.ca / "ca.crt", layout.ca / "ca.key")
    LocalFileKeyProvider.create(layout.kek)
    _issue_tier_certificates(layout, ca, public_hosts, private_hosts)
    for tier in (layout.public, layout.private):
        tier.models.mkdir(parents=True, exist_ok=True)
    layout.public_config.write_text(_PUBLIC_TOML, encoding="utf-8")
    (layout.public.root / "terms.md").write_text(_TERMS, encoding="utf-8")
    layout.private_config.write_text(_PRIVATE_TOML, encoding="utf-8")
    return layout


def _issue_tier_certificates(
    layout: DeployLayout, ca: CertKeyPair, public_hosts: Sequence[str], private_hosts: Sequence[str]
) -> None:
    loopback = {"dns_names": ["localhost"], "ip_addresses": ["127.0.0.1", "::1"]}
    public_server = issue_certificate(
        ca,
        PUBLIC_IDENTITY,
        dns_names=["localhost", "public", *public_hosts],
        ip_addresses=loopback["ip_addresses"],
        server=True,
        client=False,
    )
    public_client = issue_certificate(ca, PUBLIC_IDENTITY, server=False, client=True)
    private_server = issue_certificate(
        ca,
        PRIVATE_IDENTITY,
        dns_names=[PRIVATE_IDENTITY, "private", "localhost", *private_hosts],
        ip_addresses=loopback["ip_addresses"],
        server=True,
        client=True,
    )
    public_server.write(layout.public.tls / "server.crt", layout.public.tls / "server.key")
    public_client.write(layout.public.tls / "client.crt", layout.public.tls / "client.key")
    private_server.write(layout.private.tls / "server.crt", layout.private.tls / "server.key")
    write_ca_cert_only(ca, layout.public.ca_cert)
    write_ca_cert_only(ca, layout.private.ca_cert)


def load_ca(layout: DeployLayout) -> CertKeyPair:
    """The deployment's CA (for issuing more certificates)."""
    return CertKeyPair.load(layout.ca / "ca.crt", layout.ca / "ca.key")
