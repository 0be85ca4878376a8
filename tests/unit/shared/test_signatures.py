"""Request signatures: the RFC test vectors, the SDK's signatures verified here, every refusal."""

from __future__ import annotations

import dataclasses
import datetime as dt
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from http_message_signatures import (
    ContentDigest,
    HTTPMessageSigner,
    HTTPSignatureKeyResolver,
    algorithms,
)
from splitvault_client import RequestSigner, create_signing_key

from shared import signatures
from shared.errors import SignatureRefused, mapping_for
from shared.signatures import Claims, SignedRequest, check_digest, load_public_key, verify

# RFC 9421 appendix B.1.4, "test-key-ed25519".
RFC_ED25519_KEY = b"""-----BEGIN PRIVATE KEY-----
MC4CAQAwBQYDK2VwBCIEIJ+DYvh6SEqVTm50DFtMDoQikTmiCqirVv9mWG9qfSnF
-----END PRIVATE KEY-----
"""
BODY = b'{"inputs":[{"name":"image","shape":[2,4],"datatype":"FP32","data":[0,0,0,0,0,0,0,0]}]}'
SHAPES = {"image": (2, 4)}
WINDOW = 300.0


class _Request:
    def __init__(self, method: str, url: str, headers: dict[str, str]) -> None:
        self.method, self.url, self.headers = method, url, headers


class _Resolver(HTTPSignatureKeyResolver):
    def __init__(self, key: object) -> None:
        self.key = key

    def resolve_private_key(self, key_id: str) -> object:
        return self.key

    def resolve_public_key(self, key_id: str) -> object:
        return None


def test_rfc9421_b26_ed25519_vector() -> None:
    """The library, with cryptography's Ed25519, reproduces RFC 9421's signature exactly."""
    key = load_pem_private_key(RFC_ED25519_KEY, password=None)
    request = _Request(
        "POST",
        "https://example.com/foo?param=Value&Pet=dog",
        {
            "Host": "example.com",
            "Date": "Tue, 20 Apr 2021 02:07:55 GMT",
            "Content-Type": "application/json",
            "Content-Length": "18",
        },
    )
    signer = HTTPMessageSigner(signature_algorithm=algorithms.ED25519, key_resolver=_Resolver(key))
    signer.sign(
        request,
        key_id="test-key-ed25519",
        created=dt.datetime.fromtimestamp(1618884473, dt.UTC),
        label="sig-b26",
        include_alg=False,
        covered_component_ids=(
            "date",
            "@method",
            "@path",
            "@authority",
            "content-type",
            "content-length",
        ),
    )
    assert request.headers["Signature-Input"] == (
        'sig-b26=("date" "@method" "@path" "@authority" "content-type" "content-length")'
        ';created=1618884473;keyid="test-key-ed25519"'
    )
    assert request.headers["Signature"] == (
        "sig-b26=:wqcAqbmYJ2ji2glfAMaRy4gruYYnx2nEFN2HN6jrnDnQCK1u02Gb04v9EDgwUPiu4A0w6vuQv5lIp5"
        "WPpBKRCw==:"
    )


def test_rfc9530_content_digest() -> None:
    assert ContentDigest.create(b'{"hello": "world"}') == (
        "sha-256=:X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE=:"
    )


@pytest.fixture
def signer(tmp_path: Path) -> RequestSigner:
    create_signing_key(tmp_path / "key.json", key_id="k_0123abcd", deployment="dep-1")
    return RequestSigner.load(tmp_path / "key.json")


def _signed(signer: RequestSigner, *, created: float | None = None) -> SignedRequest:
    when = None if created is None else dt.datetime.fromtimestamp(created, dt.UTC)
    headers = signer.headers("digits", BODY, SHAPES, 3, created=when)
    found = SignedRequest.from_headers("POST", {k.lower(): v for k, v in headers.items()})
    assert found is not None
    return found


def _public(signer: RequestSigner) -> Ed25519PublicKey:
    return load_public_key(signer.public_key())


def test_sdk_signature_verifies_with_its_claims(signer: RequestSigner) -> None:
    signed = _signed(signer)
    check_digest(signed, BODY)
    verified = verify(signed, _public(signer), now=time.time(), window_s=WINDOW)
    assert verified.key_id == "k_0123abcd"
    assert verified.claims == Claims("k_0123abcd", "dep-1", "digits", 2, ("image:2x4",), 3)
    assert len(verified.nonce) >= 16
    assert _signed(signer).signature_input != signed.signature_input  # a fresh nonce each time


@pytest.mark.parametrize(
    ("field", "old", "new"),
    [
        ("claims", "rows=2", "rows=20"),
        ("claims", 'model="digits"', 'model="other"'),
        ("claims", "k=3", "k=5"),
        ("content_digest", "sha-256=:", "sha-256=:A"),
        ("method", "POST", "GET"),
        ("signature_input", 'keyid="k_0123abcd"', 'keyid="k_99999999"'),
    ],
)
def test_any_change_to_a_covered_part_is_refused(
    signer: RequestSigner, field: str, old: str, new: str
) -> None:
    signed = _signed(signer)
    assert old in getattr(signed, field)
    forged = dataclasses.replace(signed, **{field: getattr(signed, field).replace(old, new)})
    with pytest.raises(SignatureRefused):
        verify(forged, _public(signer), now=time.time(), window_s=WINDOW)


def test_another_key_is_refused(signer: RequestSigner) -> None:
    other = Ed25519PrivateKey.generate().public_key()
    with pytest.raises(SignatureRefused, match="does not verify"):
        verify(_signed(signer), other, now=time.time(), window_s=WINDOW)


@pytest.mark.parametrize("skew", [-WINDOW - 5, WINDOW + 5])
def test_time_outside_the_window_is_refused(signer: RequestSigner, skew: float) -> None:
    now = time.time()
    signed = _signed(signer, created=now + skew)
    with pytest.raises(SignatureRefused, match="outside the accepted window"):
        verify(signed, _public(signer), now=now, window_s=WINDOW)


def test_body_other_than_the_digest_is_refused(signer: RequestSigner) -> None:
    with pytest.raises(SignatureRefused, match="Content-Digest"):
        check_digest(_signed(signer), BODY.replace(b"[0,", b"[1,"))


def _library_signed(
    signer: RequestSigner, covered: tuple[str, ...], **params: object
) -> SignedRequest:
    """A signature by the right key that departs from the profile (coverage, nonce, tag)."""
    claims = Claims("k_0123abcd", "dep-1", "digits", 2, ("image:2x4",), 3).header()
    request = _Request("POST", "https://x.invalid/", {"Splitvault-Claims": claims})
    library = HTTPMessageSigner(
        signature_algorithm=algorithms.ED25519, key_resolver=_Resolver(signer.private_key)
    )
    library.sign(
        request,
        key_id="k_0123abcd",
        label="sv",
        covered_component_ids=covered,
        body=BODY,
        **params,  # type: ignore[arg-type]
    )
    headers = {k.lower(): v for k, v in request.headers.items()}
    found = SignedRequest.from_headers("POST", headers)
    assert found is not None
    return found


@pytest.mark.parametrize(
    ("covered", "params"),
    [
        (
            ("@method", "content-digest"),
            {"nonce": "n1", "tag": signatures.TAG},
        ),  # claims not covered
        (signatures.COVERED, {"tag": signatures.TAG}),  # no nonce
        (signatures.COVERED, {"nonce": "n1"}),  # no tag
        (signatures.COVERED, {"nonce": "n1", "tag": "other"}),
    ],
)
def test_signatures_outside_the_profile_are_refused(
    signer: RequestSigner, covered: tuple[str, ...], params: dict[str, object]
) -> None:
    signed = _library_signed(signer, covered, **params)
    with pytest.raises(SignatureRefused):
        verify(signed, _public(signer), now=time.time(), window_s=WINDOW)


def test_a_profile_signature_by_the_library_verifies(signer: RequestSigner) -> None:
    """The control for the test above: the same construction, inside the profile."""
    signed = _library_signed(signer, signatures.COVERED, nonce="n1", tag=signatures.TAG)
    assert verify(signed, _public(signer), now=time.time(), window_s=WINDOW).nonce == "n1"


def test_partial_signature_headers_are_refused() -> None:
    with pytest.raises(SignatureRefused, match="missing header"):
        SignedRequest.from_headers("POST", {"signature": "sv=:AA==:"})
    assert SignedRequest.from_headers("POST", {"content-digest": "x"}) is None


def test_refusals_are_401_and_permission_denied_across_tiers() -> None:
    mapping = mapping_for(SignatureRefused("x"))
    assert (mapping.http_status, mapping.grpc_code.name, mapping.reason) == (
        401,
        "PERMISSION_DENIED",
        "signature",
    )
