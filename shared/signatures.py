"""Customer request signatures: RFC 9421 HTTP Message Signatures (Ed25519) over claims.

A customer's SDK signs each inference request with its own Ed25519 key. The signature (label
``sv``, tag ``TAG``) covers ``COVERED``: the method, the body's RFC 9530
``Content-Digest`` and the ``Splitvault-Claims`` header, a Structured Field Dictionary::

    Splitvault-Claims: key="k_0123abcd", deployment="9f2c...", model="digits", rows=64,
                       k=3, shapes=("image:64x1x8x8")

and its parameters carry ``created``, ``keyid`` (the API key id), ``alg="ed25519"`` and a
``nonce``. The public tier checks what it can without the customer's public key (digest,
time, claims against the body) and forwards a ``SignedRequest``; the private tier, which holds
the registered public keys, verifies the signature and checks the claims against what it is
asked to answer (``private_core.attribution``). Signing and verification use the maintained
``http-message-signatures`` library; this module fixes the profile and parses the claims.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import http_sf
from cryptography.exceptions import InvalidSignature as InvalidEd25519
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from http_message_signatures import (
    ContentDigest,
    HTTPMessageSignaturesException,
    HTTPMessageVerifier,
    HTTPSignatureKeyResolver,
    algorithms,
)

from shared.errors import SignatureRefused

LABEL = "sv"
TAG = "splitvault-v1"
CLAIMS_HEADER = "splitvault-claims"
# The claims name the model and the endpoint's meaning; the path is not covered, so that a
# proxy in front of the public tier may rewrite it.
COVERED = ("@method", "content-digest", CLAIMS_HEADER)
_HEADERS = ("content-digest", CLAIMS_HEADER, "signature-input", "signature")
_MAX_HEADER = 8192  # longer signature headers are refused before parsing


@dataclass(frozen=True)
class Claims:
    """What a signed request declares: who, where, which model, how many rows of which
    shapes (``name:AxBxC``, sorted by name) and the top-k asked for (0: the policy's)."""

    key_id: str
    deployment: str
    model: str
    rows: int
    shapes: tuple[str, ...]
    k: int = 0

    @staticmethod
    def shapes_of(shapes: Mapping[str, tuple[int, ...] | list[int]]) -> tuple[str, ...]:
        """Input shapes in the claims' form."""
        return tuple(
            f"{name}:{'x'.join(map(str, shape))}" for name, shape in sorted(shapes.items())
        )

    def shape_map(self) -> dict[str, tuple[int, ...]]:
        """The claimed shapes by input name; ``SignatureRefused`` if one is malformed."""
        found: dict[str, tuple[int, ...]] = {}
        for item in self.shapes:
            name, _, dims = item.rpartition(":")
            try:
                shape = tuple(int(d) for d in dims.split("x")) if dims else ()
            except ValueError:
                raise SignatureRefused(
                    f"request signature: malformed shape claim {item!r}"
                ) from None
            if not name or name in found:
                raise SignatureRefused(f"request signature: malformed shape claim {item!r}")
            found[name] = shape
        return found

    def header(self) -> str:
        """The ``Splitvault-Claims`` field value."""
        members: dict[str, Any] = {
            "key": self.key_id,
            "deployment": self.deployment,
            "model": self.model,
            "rows": self.rows,
            "k": self.k,
            "shapes": list(self.shapes),
        }
        return str(http_sf.ser(members))

    @classmethod
    def parse(cls, value: str) -> Claims:
        """Claims from a field value; ``SignatureRefused`` when malformed."""
        try:
            members: Any = http_sf.parse(value.encode("ascii"), tltype="dictionary")
            fields = {name: item[0] for name, item in members.items()}
            shapes = fields["shapes"]
            claims = cls(
                key_id=fields["key"],
                deployment=fields["deployment"],
                model=fields["model"],
                rows=fields["rows"],
                shapes=tuple(entry[0] for entry in shapes),
                k=fields.get("k", 0),
            )
        except (ValueError, KeyError, TypeError, IndexError, UnicodeError):
            raise SignatureRefused("request signature: malformed Splitvault-Claims") from None
        text = (claims.key_id, claims.deployment, claims.model, *claims.shapes)
        numbers = (claims.rows, claims.k)
        if not all(isinstance(v, str) for v in text) or not all(_is_int(n) for n in numbers):
            raise SignatureRefused("request signature: malformed Splitvault-Claims")
        return claims


@dataclass(frozen=True)
class SignedRequest:
    """What a signed HTTP request carried for its signature, as forwarded between the tiers
    and kept with the answer (``record``) so that the owner can verify it again offline."""

    method: str
    content_digest: str
    claims: str
    signature_input: str
    signature: str

    @classmethod
    def from_headers(cls, method: str, headers: Mapping[str, str]) -> SignedRequest | None:
        """The request's signature fields; None when it carries no signature at all.
        ``SignatureRefused`` when some are missing or oversized."""
        values = {name: headers.get(name) for name in _HEADERS}
        if values["signature"] is None and values["signature-input"] is None:
            return None
        missing = [name for name, value in values.items() if value is None]
        if missing:
            raise SignatureRefused(f"request signature: missing header {missing[0]}")
        if any(len(str(value)) > _MAX_HEADER for value in values.values()):
            raise SignatureRefused("request signature: header too long")
        return cls(
            method,
            str(values["content-digest"]),
            str(values[CLAIMS_HEADER]),
            str(values["signature-input"]),
            str(values["signature"]),
        )

    def record(self) -> dict[str, str]:
        """The fields as a JSON-ready mapping."""
        return asdict(self)


@dataclass(frozen=True)
class Verified:
    """A signature that verified: its key id, time, nonce and (verified) claims."""

    key_id: str
    created: int
    nonce: str
    claims: Claims


@dataclass(frozen=True)
class SignatureParams:
    """A signature's parameters, read without verifying it (the public tier's checks)."""

    key_id: str
    created: int
    nonce: str


def signature_params(signed: SignedRequest) -> SignatureParams:
    """The ``sv`` signature's parameters; ``SignatureRefused`` when absent or malformed."""
    try:
        members: Any = http_sf.parse(signed.signature_input.encode("ascii"), tltype="dictionary")
        params = members[LABEL][1]
        key_id, created, nonce = params["keyid"], params["created"], params["nonce"]
    except (ValueError, KeyError, TypeError, IndexError, UnicodeError):
        raise SignatureRefused(
            f"request signature: Signature-Input needs label {LABEL!r} with keyid, created, nonce"
        ) from None
    if not isinstance(key_id, str) or not isinstance(nonce, str) or not _is_int(created):
        raise SignatureRefused("request signature: malformed signature parameters")
    return SignatureParams(key_id, created, nonce)


def check_time(created: int, now: float, window_s: float) -> None:
    """Refuse a signature made more than ``window_s`` seconds from ``now``."""
    if abs(now - created) > window_s:
        raise SignatureRefused(
            f"request signature: created {created} is outside the accepted window of "
            f"{window_s:g} s (check the client's clock)"
        )


def check_digest(signed: SignedRequest, body: bytes) -> None:
    """Refuse a ``Content-Digest`` that does not match ``body``."""
    try:
        ContentDigest.verify(signed.content_digest, body)
    except HTTPMessageSignaturesException:
        raise SignatureRefused(
            "request signature: Content-Digest does not match the body"
        ) from None


def verify(
    signed: SignedRequest, public_key: Ed25519PublicKey, *, now: float, window_s: float
) -> Verified:
    """Verify ``signed`` with ``public_key``: the ``sv`` signature, tagged ``TAG``, Ed25519,
    covering ``COVERED``, made within ``window_s`` of ``now``. ``SignatureRefused`` otherwise."""
    params = signature_params(signed)
    check_time(params.created, now, window_s)
    verifier = HTTPMessageVerifier(
        signature_algorithm=algorithms.ED25519, key_resolver=_OneKey(params.key_id, public_key)
    )
    verifier.max_clock_skew = dt.timedelta(seconds=window_s)
    try:
        results = verifier.verify(
            _Message(signed),
            max_age=None,
            expect_tag=TAG,
            expect_label=LABEL,
            require_components=COVERED,
        )
    except (HTTPMessageSignaturesException, InvalidEd25519, ValueError):
        raise SignatureRefused("request signature: does not verify") from None
    parameters = results[0].parameters
    if parameters.get("alg") != algorithms.ED25519.algorithm_id:
        raise SignatureRefused("request signature: alg must be ed25519")
    claims = Claims.parse(results[0].covered_components[f'"{CLAIMS_HEADER}"'])
    if claims.key_id != params.key_id:
        raise SignatureRefused("request signature: claimed key differs from keyid")
    return Verified(params.key_id, params.created, params.nonce, claims)


def deployment_id(ca_cert_pem: bytes) -> str:
    """A deployment's id in claims: SHA-256 of its CA certificate (DER), first 16 bytes, hex."""
    from cryptography import x509

    der = x509.load_pem_x509_certificate(ca_cert_pem).public_bytes(serialization.Encoding.DER)
    return hashlib.sha256(der).hexdigest()[:32]


def public_key_text(key: Ed25519PublicKey) -> str:
    """A public key as registered: ``ed25519:`` and its 32 raw bytes in base64."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "ed25519:" + base64.b64encode(raw).decode("ascii")


def load_public_key(text: str) -> Ed25519PublicKey:
    """The key of ``public_key_text`` form; ``ValueError`` if it is not one."""
    kind, _, data = text.strip().partition(":")
    try:
        raw = base64.b64decode(data, validate=True)
        if kind != "ed25519" or len(raw) != 32:
            raise ValueError
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError:
        raise ValueError("a signer's public key is 'ed25519:' and 32 bytes in base64") from None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class _OneKey(HTTPSignatureKeyResolver):
    """Resolves exactly one key id to its registered public key."""

    def __init__(self, key_id: str, key: Ed25519PublicKey) -> None:
        self._key_id, self._key = key_id, key

    def resolve_public_key(self, key_id: str) -> Ed25519PublicKey | None:
        return self._key if key_id == self._key_id else None

    def resolve_private_key(self, key_id: str) -> None:
        raise NotImplementedError("verification only")


class _Message:
    """The parts of the HTTP request a signature covers, as the library reads a message."""

    def __init__(self, signed: SignedRequest) -> None:
        self.method = signed.method
        self.url = "https://splitvault.invalid/"  # not covered; the library needs one
        self.headers = {
            "Content-Digest": signed.content_digest,
            "Splitvault-Claims": signed.claims,
            "Signature-Input": signed.signature_input,
            "Signature": signed.signature,
        }
