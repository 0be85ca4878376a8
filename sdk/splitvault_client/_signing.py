"""Request signing: RFC 9421 HTTP Message Signatures with the customer's own Ed25519 key.

Each inference request is signed over its method, its RFC 9530 ``Content-Digest`` and a
``Splitvault-Claims`` header (key id, deployment, model, rows, input shapes, k), with a fresh
``created`` time and ``nonce``. The server's private tier, which holds the public key the
operator registered, verifies it and answers each signed request at most once: without this key
nobody, not even the host of the public tier, can have a call recorded under this key id.

Needs the ``signing`` extra (``http-message-signatures``, which brings ``cryptography``).
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LABEL = "sv"
TAG = "splitvault-v1"
COVERED = ("@method", "content-digest", "splitvault-claims")
_FORMAT = "splitvault-signing-key/1"


def _library() -> Any:
    try:
        import http_message_signatures
    except ImportError:
        raise ImportError(
            "request signing needs the 'signing' extra: pip install 'splitvault-client[signing]'"
        ) from None
    return http_message_signatures


@dataclass(frozen=True)
class RequestSigner:
    """A customer's signing key, bound to one API key id and one deployment."""

    key_id: str
    deployment: str
    private_key: Any = field(repr=False)  # cryptography's Ed25519PrivateKey

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> RequestSigner:
        """Read a key file written by ``create_signing_key``."""
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
        from cryptography.hazmat.primitives.serialization import load_pem_private_key

        doc = json.loads(Path(path).read_text("utf-8"))
        if not isinstance(doc, dict) or doc.get("format") != _FORMAT:
            raise ValueError(f"{path}: not a splitvault signing key file")
        key = load_pem_private_key(doc["private_key"].encode("ascii"), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{path}: the key is not Ed25519")
        return cls(str(doc["key_id"]), str(doc["deployment"]), key)

    def public_key(self) -> str:
        """The public key to give the operator: ``ed25519:`` and 32 bytes in base64."""
        from cryptography.hazmat.primitives import serialization

        raw = self.private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        return "ed25519:" + base64.b64encode(raw).decode("ascii")

    def headers(
        self,
        model: str,
        body: bytes,
        shapes: Mapping[str, tuple[int, ...]],
        top_k: int | None,
        *,
        created: dt.datetime | None = None,
        nonce: str | None = None,
    ) -> dict[str, str]:
        """The headers that sign one inference ``POST`` of ``body`` (fresh time and nonce)."""
        hms = _library()
        rows = min((shape[0] for shape in shapes.values() if shape), default=1)
        message = _Message("POST", {"Splitvault-Claims": self._claims(model, rows, shapes, top_k)})
        signer = hms.HTTPMessageSigner(
            signature_algorithm=hms.algorithms.ED25519, key_resolver=_Resolver(self)
        )
        signer.sign(
            message,
            key_id=self.key_id,
            created=created or dt.datetime.now(dt.UTC),
            nonce=nonce or secrets.token_urlsafe(18),
            label=LABEL,
            tag=TAG,
            covered_component_ids=COVERED,
            body=body,
        )
        return dict(message.headers)

    def _claims(
        self, model: str, rows: int, shapes: Mapping[str, tuple[int, ...]], top_k: int | None
    ) -> str:
        import http_sf

        listed = [f"{name}:{'x'.join(map(str, shape))}" for name, shape in sorted(shapes.items())]
        members: Any = {
            "key": self.key_id,
            "deployment": self.deployment,
            "model": model,
            "rows": rows,
            "k": top_k or 0,
            "shapes": listed,
        }
        return str(http_sf.ser(members))


def create_signing_key(path: str | os.PathLike[str], *, key_id: str, deployment: str) -> str:
    """Generate an Ed25519 key on this machine into a new 0600 file ``path``; returns its
    public key (``ed25519:...``) for the operator to register for ``key_id``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    if not key_id or not deployment:
        raise ValueError("key_id and deployment must be non-empty")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode("ascii")
    doc = {"format": _FORMAT, "key_id": key_id, "deployment": deployment, "private_key": pem}
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        os.fchmod(out.fileno(), 0o600)
        json.dump(doc, out, indent=2)
    return RequestSigner(key_id, deployment, key).public_key()


class _Message:
    """A request as the signing library reads one: method, absolute URL, headers."""

    def __init__(self, method: str, headers: dict[str, str]) -> None:
        self.method = method
        self.url = "https://splitvault.invalid/"  # the URL is not covered
        self.headers = headers


class _Resolver:
    def __init__(self, signer: RequestSigner) -> None:
        self._signer = signer

    def resolve_private_key(self, key_id: str) -> Any:
        if key_id != self._signer.key_id:
            raise KeyError(key_id)
        return self._signer.private_key

    def resolve_public_key(self, key_id: str) -> Any:
        return self._signer.private_key.public_key()
