"""Key-encryption key (KEK) providers for envelope encryption.

Each encrypted file carries a fresh data key (DEK) that a ``KeyProvider`` wraps under its KEK.
``LocalFileKeyProvider`` keeps the KEK in a local file; a cloud KMS can replace it by
implementing the same three members.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from pathlib import Path
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEK_SIZE = 32
_NONCE_SIZE = 12
_TAG_SIZE = 16
_KEK_ID_LABEL = b"splitvault-kek-id"


class KeyUnwrapError(Exception):
    """A wrapped key was not made by this KEK, or under a different context."""


class KeyProvider(Protocol):
    """Wraps and unwraps data keys under one key-encryption key."""

    @property
    def kek_id(self) -> str:
        """A public name of the KEK that reveals nothing about it."""
        ...

    def wrap(self, data_key: bytes, context: bytes) -> bytes:
        """Encrypt ``data_key``, binding it to ``context`` (authenticated, not secret)."""
        ...

    def unwrap(self, wrapped: bytes, context: bytes) -> bytes:
        """Return the data key; raise ``KeyUnwrapError`` on a wrong KEK or context."""
        ...


def kek_id_of(kek: bytes) -> str:
    """Return the public id of ``kek``: 16 hex chars of SHA-256 over a label and the key."""
    return hashlib.sha256(_KEK_ID_LABEL + kek).hexdigest()[:16]


class LocalFileKeyProvider:
    """A 32-byte KEK held in memory, read from a base64 text file; wraps with AES-256-GCM.

    Wrapped format: 12-byte random nonce || ciphertext || 16-byte tag, with ``context`` as the
    associated data.
    """

    __slots__ = ("_aead", "_kek_id")

    def __init__(self, kek: bytes) -> None:
        if len(kek) != KEK_SIZE:
            raise ValueError(f"a KEK must be {KEK_SIZE} bytes, got {len(kek)}")
        self._aead = AESGCM(kek)
        self._kek_id = kek_id_of(kek)

    @classmethod
    def from_bytes(cls, kek: bytes) -> LocalFileKeyProvider:
        """Make a provider from raw KEK bytes (32 bytes)."""
        return cls(kek)

    @classmethod
    def create(cls, path: Path) -> LocalFileKeyProvider:
        """Make a new random KEK, store it base64 in ``path`` (mode 0o600) and return it.

        Raises ``FileExistsError`` rather than overwrite a key that may still protect files.
        """
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        kek = os.urandom(KEK_SIZE)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write(base64.b64encode(kek) + b"\n")
        return cls(kek)

    @classmethod
    def load(cls, path: Path) -> LocalFileKeyProvider:
        """Read a KEK file written by ``create``; ``ValueError`` if it is not a base64 32-byte key."""
        text = path.read_bytes().strip()
        try:
            kek = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"{path} is not a base64-encoded {KEK_SIZE}-byte key") from None
        if len(kek) != KEK_SIZE:
            raise ValueError(
                f"{path} holds a {len(kek)}-byte key; a KEK must be {KEK_SIZE} bytes (base64)"
            )
        return cls(kek)

    @property
    def kek_id(self) -> str:
        """Public id of this KEK."""
        return self._kek_id

    def wrap(self, data_key: bytes, context: bytes) -> bytes:
        """Encrypt ``data_key`` under the KEK with ``context`` as associated data."""
        nonce = os.urandom(_NONCE_SIZE)
        return nonce + self._aead.encrypt(nonce, data_key, context)

    def unwrap(self, wrapped: bytes, context: bytes) -> bytes:
        """Decrypt a key made by ``wrap``; ``KeyUnwrapError`` on a wrong KEK or context."""
        if len(wrapped) < _NONCE_SIZE + _TAG_SIZE:
            raise KeyUnwrapError("wrapped key is too short")
        view = memoryview(wrapped)
        try:
            return self._aead.decrypt(view[:_NONCE_SIZE], view[_NONCE_SIZE:], context)
        except InvalidTag:
            raise KeyUnwrapError(
                f"the key was not wrapped by KEK {self._kek_id} under this context"
            ) from None

    def __repr__(self) -> str:
        return f"LocalFileKeyProvider(kek_id={self._kek_id!r})"
