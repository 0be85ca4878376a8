"""An audit anchor receipt: the private tier's signed statement that a chain had a given head.

The receipt says: "chain ``chain_id`` had ``record_count`` records, the last one (``seq``)
hashing to ``head``, when replica ``replica_id`` recorded it in its ledger at ``anchored_at``,
asked by certificate identity ``anchored_by``". It is signed with the replica's Ed25519 key over
the canonical JSON of every field but the signature (``signed_bytes``); ``signer`` names the key
(``key_id``). Both tiers and the operator's verifier use this one definition.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from protos import inference_pb2
from shared.errors import InvalidInput

RECEIPT_FORMAT = "splitvault-anchor-receipt/1"
CHAIN_ID = re.compile(r"[0-9a-f]{32}")
HEAD = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class AnchorReceipt:
    """One anchor of one audit chain, as recorded and signed by one private replica."""

    chain_id: str
    seq: int
    head: str
    record_count: int
    anchored_at: float
    replica_id: str
    anchored_by: str
    signer: str
    signature: str = ""  # base64 Ed25519 signature of ``signed_bytes()``

    def signed_bytes(self) -> bytes:
        """The canonical JSON the signature covers (every field but the signature)."""
        body = {**asdict(self), "format": RECEIPT_FORMAT}
        del body["signature"]
        return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()

    def signed_with(self, key: Ed25519PrivateKey) -> AnchorReceipt:
        """This receipt with ``signer`` set to ``key``'s id and signed by it."""
        unsigned = replace(self, signer=key_id(key.public_key()), signature="")
        signature = key.sign(unsigned.signed_bytes())
        return replace(unsigned, signature=base64.b64encode(signature).decode("ascii"))

    def verifies_with(self, public_key: Ed25519PublicKey) -> bool:
        """Whether ``public_key`` is the signer's and its signature is valid."""
        if self.signer != key_id(public_key):
            return False
        try:
            public_key.verify(base64.b64decode(self.signature, validate=True), self.signed_bytes())
        except (InvalidSignature, binascii.Error, ValueError):
            return False
        return True

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict of every field."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> AnchorReceipt:
        """Parse a ``to_json`` dict; ``ValueError`` when a field is missing or mistyped."""
        if not isinstance(data, dict) or set(data) != {f.name for f in fields(cls)}:
            raise ValueError("an anchor receipt needs exactly the receipt's fields")
        receipt = cls(**data)
        for name, kind in (("seq", int), ("record_count", int), ("anchored_at", float)):
            value = getattr(receipt, name)
            if isinstance(value, bool) or not isinstance(value, kind | int):
                raise ValueError(f"anchor receipt field {name!r} has the wrong type")
        try:
            check_anchor(receipt.chain_id, receipt.seq, receipt.head, receipt.record_count)
        except InvalidInput as error:
            raise ValueError(f"anchor receipt: {error.message}") from None
        return replace(receipt, anchored_at=float(receipt.anchored_at))

    def to_proto(self) -> inference_pb2.AnchorReceipt:
        """The receipt as the ``AnchorAudit`` RPC returns it."""
        values = asdict(self)
        values["signature"] = base64.b64decode(self.signature)
        return inference_pb2.AnchorReceipt(**values)

    @classmethod
    def from_proto(cls, message: inference_pb2.AnchorReceipt) -> AnchorReceipt:
        """The receipt in an ``AnchorAudit`` reply (``InvalidInput`` if malformed)."""
        check_anchor(message.chain_id, message.seq, message.head, message.record_count)
        return cls(
            chain_id=message.chain_id,
            seq=message.seq,
            head=message.head,
            record_count=message.record_count,
            anchored_at=message.anchored_at,
            replica_id=message.replica_id,
            anchored_by=message.anchored_by,
            signer=message.signer,
            signature=base64.b64encode(message.signature).decode("ascii"),
        )


def check_anchor(chain_id: str, seq: int, head: str, record_count: int) -> None:
    """``InvalidInput`` unless the anchored values are well formed (see ``AnchorRequest``)."""
    if not isinstance(chain_id, str) or not CHAIN_ID.fullmatch(chain_id):
        raise InvalidInput("chain_id must be 32 lowercase hex digits")
    if not isinstance(head, str) or not HEAD.fullmatch(head):
        raise InvalidInput("head must be 64 lowercase hex digits")
    if seq < 1:
        raise InvalidInput("seq must be at least 1")
    if record_count != seq:
        raise InvalidInput("record_count must equal seq (record numbers have no gaps)")


def key_id(public_key: Ed25519PublicKey) -> str:
    """The first 16 hex digits of the SHA-256 of the raw public key."""
    return hashlib.sha256(public_key_bytes(public_key)).hexdigest()[:16]


def public_key_bytes(public_key: Ed25519PublicKey) -> bytes:
    """The 32 raw bytes of an Ed25519 public key."""
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_key_text(public_key: Ed25519PublicKey) -> str:
    """The raw public key in base64, as ledgers and anchor files carry it."""
    return base64.b64encode(public_key_bytes(public_key)).decode("ascii")


def load_public_key(text: str) -> Ed25519PublicKey:
    """Parse ``public_key_text``; ``ValueError`` when it is not a raw Ed25519 key."""
    try:
        return Ed25519PublicKey.from_public_bytes(base64.b64decode(text, validate=True))
    except (binascii.Error, ValueError):
        raise ValueError("not a base64 raw Ed25519 public key") from None
