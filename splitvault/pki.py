"""A private certificate authority and the mutual-TLS certificates of the two tiers.

All keys are EC P-256 and all signatures ECDSA with SHA-256.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# Backdate certificates a little so that small clock skew between hosts does not reject them.
_CLOCK_SKEW = dt.timedelta(minutes=5)


@dataclass(frozen=True)
class CertKeyPair:
    """A certificate and its private key."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def cert_pem(self) -> bytes:
        """The certificate, PEM-encoded."""
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        """The private key, PEM-encoded PKCS#8, unencrypted."""
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def write(self, cert_path: Path, key_path: Path | None) -> None:
        """Write the certificate (mode 0o644) and, unless ``key_path`` is None, the key (0o600).

        Parent folders are created; each file is replaced atomically.
        """
        _write_atomic(cert_path, self.cert_pem(), 0o644)
        if key_path is not None:
            _write_atomic(key_path, self.key_pem(), 0o600)

    @classmethod
    def load(cls, cert_path: Path, key_path: Path) -> CertKeyPair:
        """Read a PEM certificate and its PEM private key; ``ValueError`` if they do not match."""
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if isinstance(key, ec.EllipticCurvePrivateKey) and key.public_key() == cert.public_key():
            return cls(cert, key)
        raise ValueError(f"the key in {key_path} does not match the certificate {cert_path}")

    def __repr__(self) -> str:
        return f"CertKeyPair(subject={self.cert.subject.rfc4514_string()!r})"


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_ca_cert_only(ca: CertKeyPair, path: Path) -> None:
    """Write just the CA certificate (what each tier needs to verify its peer)."""
    ca.write(path, None)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def create_ca(common_name: str = "splitvault private CA", valid_days: int = 3650) -> CertKeyPair:
    """Create a self-signed CA that may sign leaf certificates only (path length 0)."""
    if valid_days <= 0:
        raise ValueError("valid_days must be positive")
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=valid_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return CertKeyPair(cert, key)


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _san(dns_names: Sequence[str], ip_addresses: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = [x509.DNSName(name) for name in dns_names]
    names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_addresses]
    return x509.SubjectAlternativeName(names)


def _eku(server: bool, client: bool) -> x509.ExtendedKeyUsage:
    if not (server or client):
        raise ValueError("a certificate must allow server or client authentication (or both)")
    usages = [ExtendedKeyUsageOID.SERVER_AUTH] if server else []
    usages += [ExtendedKeyUsageOID.CLIENT_AUTH] if client else []
    return x509.ExtendedKeyUsage(usages)


def _validity(
    ca: CertKeyPair, not_before: dt.datetime | None, valid_days: int
) -> tuple[dt.datetime, dt.datetime]:
    if valid_days <= 0:
        raise ValueError("valid_days must be positive")
    if not_before is None:
        not_before = dt.datetime.now(dt.UTC) - _CLOCK_SKEW
    elif not_before.tzinfo is None:
        raise ValueError("not_before must be timezone-aware")
    # A leaf must not outlive its CA: clients would reject it after the CA expires anyway.
    not_after = min(not_before + dt.timedelta(days=valid_days), ca.cert.not_valid_after_utc)
    if not_after <= not_before:
        raise ValueError("the certificate would start after its CA expires")
    return not_before, not_after


def issue_certificate(
    ca: CertKeyPair,
    common_name: str,
    *,
    dns_names: Sequence[str] = (),
    ip_addresses: Sequence[str] = (),
    server: bool,
    client: bool,
    valid_days: int = 397,
    not_before: dt.datetime | None = None,
) -> CertKeyPair:
    """Issue a leaf certificate signed by ``ca`` for TLS server and/or client authentication.

    ``dns_names`` and ``ip_addresses`` go in the subjectAltName. ``not_before`` (timezone-aware,
    default: now minus a few minutes) and ``valid_days`` set the validity; it ends no later than
    the CA's.
    """
    eku = _eku(server, client)
    start, end = _validity(ca, not_before, valid_days)
    key = ec.generate_private_key(ec.SECP256R1())
    ca_ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(eku, critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
    )
    if dns_names or ip_addresses:
        builder = builder.add_extension(_san(dns_names, ip_addresses), critical=False)
    return CertKeyPair(builder.sign(ca.key, hashes.SHA256()), key)
