"""Tests of the private CA and tier certificates, with real keys and signatures."""

from __future__ import annotations

import datetime as dt
import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from splitvault.pki import CertKeyPair, create_ca, issue_certificate, write_ca_cert_only


@pytest.fixture(scope="module")
def ca() -> CertKeyPair:
    return create_ca()


def _cn(cert: x509.Certificate) -> str:
    value = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    return value if isinstance(value, str) else value.decode()


def _eku(cert: x509.Certificate) -> set[x509.ObjectIdentifier]:
    return set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def test_ca_is_a_self_signed_ca(ca: CertKeyPair) -> None:
    cert = ca.cert
    assert _cn(cert) == "splitvault private CA"
    assert isinstance(ca.key.curve, ec.SECP256R1)
    cert.verify_directly_issued_by(cert)
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(ca.key.public_key())
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert dt.timedelta(days=3650) <= lifetime <= dt.timedelta(days=3650, minutes=10)


def test_server_certificate_has_requested_names_and_usage(ca: CertKeyPair) -> None:
    leaf = issue_certificate(
        ca,
        "splitvault-private",
        dns_names=["private-core", "localhost"],
        ip_addresses=["127.0.0.1", "::1"],
        server=True,
        client=False,
    )
    leaf.cert.verify_directly_issued_by(ca.cert)
    assert _cn(leaf.cert) == "splitvault-private"
    san = leaf.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["private-core", "localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    assert _eku(leaf.cert) == {ExtendedKeyUsageOID.SERVER_AUTH}
    assert not leaf.cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    aki = leaf.cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ca_ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ca_ski.digest
    assert leaf.cert.issuer == ca.cert.subject


def test_client_and_dual_certificates(ca: CertKeyPair) -> None:
    client = issue_certificate(ca, "splitvault-public", server=False, client=True)
    assert _eku(client.cert) == {ExtendedKeyUsageOID.CLIENT_AUTH}
    both = issue_certificate(ca, "both", dns_names=["x"], server=True, client=True)
    assert _eku(both.cert) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    with pytest.raises(ValueError, match="server or client"):
        issue_certificate(ca, "nothing", server=False, client=False)


def test_leaf_signed_by_another_ca_does_not_verify(ca: CertKeyPair) -> None:
    other = create_ca("another CA")
    leaf = issue_certificate(other, "impostor", server=True, client=True)
    with pytest.raises((InvalidSignature, ValueError)):
        leaf.cert.verify_directly_issued_by(ca.cert)


def test_not_before_and_valid_days_are_honoured(ca: CertKeyPair) -> None:
    future = dt.datetime.now(dt.UTC) + dt.timedelta(days=2)
    later = issue_certificate(ca, "later", server=True, client=False, not_before=future)
    assert later.cert.not_valid_before_utc == future.replace(microsecond=0)
    assert later.cert.not_valid_after_utc - later.cert.not_valid_before_utc == dt.timedelta(
        days=397
    )
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=10)
    expired = issue_certificate(
        ca, "expired", server=True, client=False, not_before=past, valid_days=1
    )
    assert expired.cert.not_valid_after_utc < dt.datetime.now(dt.UTC)
    with pytest.raises(ValueError, match="timezone"):
        issue_certificate(
            ca, "naive", server=True, client=False, not_before=dt.datetime(2030, 1, 1)
        )


def test_leaf_does_not_outlive_its_ca() -> None:
    short_ca = create_ca(valid_days=30)
    leaf = issue_certificate(short_ca, "leaf", server=True, client=False, valid_days=397)
    assert leaf.cert.not_valid_after_utc == short_ca.cert.not_valid_after_utc


def test_write_and_load_round_trip(ca: CertKeyPair, tmp_path: Path) -> None:
    leaf = issue_certificate(ca, "leaf", dns_names=["leaf"], server=True, client=False)
    cert_path, key_path = tmp_path / "tls" / "leaf.crt", tmp_path / "tls" / "leaf.key"
    leaf.write(cert_path, key_path)
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert cert_path.read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
    assert key_path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    loaded = CertKeyPair.load(cert_path, key_path)
    assert loaded.cert == leaf.cert
    assert loaded.key.private_numbers() == leaf.key.private_numbers()
    assert list(tmp_path.joinpath("tls").iterdir()) != [] and not any(
        p.name.startswith(".") for p in tmp_path.joinpath("tls").iterdir()
    )


def test_load_rejects_a_key_of_another_certificate(ca: CertKeyPair, tmp_path: Path) -> None:
    first = issue_certificate(ca, "first", server=True, client=False)
    second = issue_certificate(ca, "second", server=True, client=False)
    first.write(tmp_path / "a.crt", tmp_path / "a.key")
    second.write(tmp_path / "b.crt", tmp_path / "b.key")
    with pytest.raises(ValueError, match="does not match"):
        CertKeyPair.load(tmp_path / "a.crt", tmp_path / "b.key")


def test_load_rejects_a_key_that_is_not_ec(ca: CertKeyPair, tmp_path: Path) -> None:
    ca.write(tmp_path / "ca.crt", None)
    other = ed25519.Ed25519PrivateKey.generate()
    pem = other.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    (tmp_path / "ca.key").write_bytes(pem)
    with pytest.raises(ValueError, match="does not match"):
        CertKeyPair.load(tmp_path / "ca.crt", tmp_path / "ca.key")


def test_write_ca_cert_only_leaves_no_key(ca: CertKeyPair, tmp_path: Path) -> None:
    path = tmp_path / "public" / "tls" / "ca.crt"
    write_ca_cert_only(ca, path)
    assert x509.load_pem_x509_certificate(path.read_bytes()) == ca.cert
    assert [p.name for p in path.parent.iterdir()] == ["ca.crt"]
    assert b"PRIVATE" not in path.read_bytes()


def test_repr_does_not_show_the_key(ca: CertKeyPair) -> None:
    assert "PRIVATE" not in repr(ca) and "splitvault private CA" in repr(ca)
