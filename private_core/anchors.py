"""Audit anchors: check what the public tier asks to anchor, record it in the ledger, sign it.

For each audit chain the book knows every anchor this replica recorded. An anchor request is
answered by one of:

* the same chain, seq and head as an anchor already recorded: that anchor's receipt again (a
  retry after a lost reply records nothing new);
* the same chain and seq with another head: refused (``AnchorConflict``, logged as
  ``audit_anchor_conflict``): someone rewrote records the replica had anchored;
* a seq not above the chain's last anchor: refused (``AnchorConflict``, logged as
  ``audit_anchor_out_of_order``): anchors of a chain only move forward;
* otherwise a new ``anchor`` ledger record, fsynced before its signed receipt is returned.

The signing key (Ed25519, ``STATE/ledger/SEGMENT.key``, 0600) is made the first time a segment
is used and stored encrypted under the private tier's KEK (the weights' envelope format, so
``splitvault keys rotate-kek`` re-wraps it): a copy of the state volume without the KEK cannot
sign receipts. Its public half is registered in the ledger (a ``signing_key`` record), so an
export of the ledger carries the key its receipts verify with. A key file left in plain PEM
by an older release is encrypted in place the first time it is loaded.
"""

from __future__ import annotations

import io
import os
import threading
import time
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from private_core.ledger import Ledger
from shared.anchor_receipt import AnchorReceipt, check_anchor, key_id, public_key_text
from shared.crypto import MAGIC, decrypt_bytes, encrypt_stream
from shared.errors import AnchorConflict
from shared.keys import KeyProvider
from shared.logs import get_logger
from shared.state_files import private_file

KEY_SUFFIX = ".key"
log = get_logger(__name__)


def signing_key_path(ledger: Ledger) -> Path:
    """Where the signing key of ``ledger``'s segment is kept."""
    return ledger.path.with_suffix(KEY_SUFFIX)


def load_signing_key(path: Path, provider: KeyProvider) -> Ed25519PrivateKey:
    """The key at ``path``, decrypted with ``provider``'s KEK; made (0600, encrypted) when the
    file is missing or empty. ``DecryptionError`` when it was encrypted under another KEK."""
    private_file(path)
    data = path.read_bytes()
    if data.startswith(MAGIC):
        return Ed25519PrivateKey.from_private_bytes(decrypt_bytes(data, provider))
    if data:
        key = serialization.load_pem_private_key(data, password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{path} does not hold an Ed25519 private key")
        log.warning("ledger_key_encrypted", path=str(path), reason="was plain PEM")
    else:
        key = Ed25519PrivateKey.generate()
    _write_encrypted(path, key, provider)
    return key


def _write_encrypted(path: Path, key: Ed25519PrivateKey, provider: KeyProvider) -> None:
    raw = key.private_bytes(
        serialization.Encoding.Raw,
        serialization.PrivateFormat.Raw,
        serialization.NoEncryption(),
    )
    buffer = io.BytesIO()
    encrypt_stream(raw, buffer, provider)
    partial = path.with_name(path.name + ".partial")
    private_file(partial)
    with partial.open("wb") as out:
        out.write(buffer.getvalue())
        out.flush()
        os.fsync(out.fileno())
    os.replace(partial, path)


class AnchorBook:
    """The anchors of one replica's ledger and the key that signs their receipts."""

    def __init__(self, ledger: Ledger, key: Ed25519PrivateKey) -> None:
        self._ledger = ledger
        self._key = key
        self._lock = threading.Lock()
        self._anchors: dict[str, dict[int, AnchorReceipt]] = {}
        self._last: dict[str, int] = {}
        for record in ledger.iter("anchor") if ledger.ok else ():
            self._index(AnchorReceipt.from_json(record.payload))

    @classmethod
    def open(cls, ledger: Ledger, provider: KeyProvider) -> AnchorBook:
        """The book of ``ledger``: its anchors indexed, its signing key decrypted with
        ``provider`` (or made and registered). ``LedgerUnavailable`` if a new key cannot be
        registered."""
        key = load_signing_key(signing_key_path(ledger), provider)
        book = cls(ledger, key)
        if ledger.ok and not book._registered():
            public = key.public_key()
            ledger.append(
                "signing_key",
                {"key_id": key_id(public), "public_key": public_key_text(public), "use": "anchor"},
            )
        return book

    @property
    def key_id(self) -> str:
        """The id of the key that signs this book's receipts."""
        return key_id(self._key.public_key())

    def anchor(
        self, chain_id: str, seq: int, head: str, record_count: int, identity: str
    ) -> AnchorReceipt:
        """Record (or find) the anchor and return its signed receipt (see the module)."""
        check_anchor(chain_id, seq, head, record_count)
        with self._lock:
            known = self._anchors.get(chain_id, {}).get(seq)
            if known is not None:
                return self._known(known, head, identity)
            last = self._last.get(chain_id, 0)
            if seq <= last:
                log.warning(
                    "audit_anchor_out_of_order",
                    chain_id=chain_id,
                    seq=seq,
                    last_anchored=last,
                    identity=identity,
                )
                raise AnchorConflict(
                    f"chain {chain_id} is anchored up to record {last}: anchors move forward only"
                )
            receipt = AnchorReceipt(
                chain_id=chain_id,
                seq=seq,
                head=head,
                record_count=record_count,
                anchored_at=time.time(),
                replica_id=self._ledger.replica_id,
                anchored_by=identity,
                signer="",
            ).signed_with(self._key)
            self._ledger.append("anchor", receipt.to_json())
            self._index(receipt)
        log.info("audit_anchor_recorded", chain_id=chain_id, seq=seq, identity=identity)
        return receipt

    def _known(self, known: AnchorReceipt, head: str, identity: str) -> AnchorReceipt:
        if known.head == head:
            return known
        log.error(
            "audit_anchor_conflict",
            chain_id=known.chain_id,
            seq=known.seq,
            anchored_head=known.head,
            offered_head=head,
            identity=identity,
        )
        raise AnchorConflict(
            f"record {known.seq} of chain {known.chain_id} is anchored with another head: "
            "the records it covers were changed"
        )

    def _index(self, receipt: AnchorReceipt) -> None:
        self._anchors.setdefault(receipt.chain_id, {})[receipt.seq] = receipt
        self._last[receipt.chain_id] = max(self._last.get(receipt.chain_id, 0), receipt.seq)

    def _registered(self) -> bool:
        mine = self.key_id
        return any(r.payload.get("key_id") == mine for r in self._ledger.iter("signing_key"))
