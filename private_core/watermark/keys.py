"""The per-model watermark key: 32 random bytes, stored encrypted like the back stage.

``splitvault pack`` creates it next to the encrypted back stage (``watermark.key.enc``, the
chunked AES-256-GCM format of ``shared.crypto`` under the deployment's KEK); only the private
tier and the owner's verifier decrypt it. Every keyed function of the watermark uses its own
subkey, derived with HKDF-SHA256 under a distinct label, so the selection of queries, the
choice of labels, the signal and the trigger log are independent of one another.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from shared.crypto import decrypt_bytes, encrypt_stream
from shared.keys import KeyProvider

WATERMARK_KEY_FILE = "watermark.key.enc"
CHOICE_FILE = (
    "watermark.choice.json"  # how pack drew the key (``splitvault.packing.watermark_key``)
)
KEY_SIZE = 32
_MAGIC = b"SVWMK\x01"
_ID_LABEL = b"splitvault-watermark-key-id"


class WatermarkKeyError(ValueError):
    """A watermark key file is missing, not a watermark key, or does not decrypt."""


@dataclass(frozen=True)
class WatermarkKey:
    """A model's watermark key; ``key_id`` names it without revealing it."""

    secret: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.secret) != KEY_SIZE:
            raise WatermarkKeyError(f"a watermark key is {KEY_SIZE} bytes, got {len(self.secret)}")

    @classmethod
    def generate(cls) -> WatermarkKey:
        """A fresh random key."""
        return cls(os.urandom(KEY_SIZE))

    @property
    def key_id(self) -> str:
        """16 hex characters of SHA-256 over a label and the key."""
        return hashlib.sha256(_ID_LABEL + self.secret).hexdigest()[:16]

    def derive(self, label: str, size: int = 32) -> bytes:
        """The subkey for ``label`` (HKDF-SHA256, no salt)."""
        hkdf = HKDF(algorithm=hashes.SHA256(), length=size, salt=None, info=label.encode())
        return hkdf.derive(self.secret)


def save_key(key: WatermarkKey, path: Path, provider: KeyProvider) -> None:
    """Encrypt ``key`` under a fresh data key wrapped by ``provider`` and write it to ``path``."""
    buffer = io.BytesIO()
    encrypt_stream(_MAGIC + key.secret, buffer, provider)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(buffer.getvalue())
            out.flush()
            os.fsync(out.fileno())
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)


def load_key(path: Path, provider: KeyProvider) -> WatermarkKey:
    """Read and decrypt a key written by ``save_key``; ``WatermarkKeyError`` if it cannot."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise WatermarkKeyError(f"no watermark key at {path}") from None
    plaintext = decrypt_bytes(data, provider)  # DecryptionError names the cause
    if not plaintext.startswith(_MAGIC) or len(plaintext) != len(_MAGIC) + KEY_SIZE:
        raise WatermarkKeyError(f"{path} does not hold a watermark key")
    return WatermarkKey(plaintext[len(_MAGIC) :])
