"""Chunked AES-256-GCM file format for encrypted model weights (envelope encryption).

Each file gets a fresh random 256-bit data key (DEK); a ``KeyProvider`` wraps the DEK under its
key-encryption key (KEK). All integers are big-endian.

Header::

    magic         6 bytes   b"SVENC\\x00"
    version       u16       1
    file_id       16 bytes  random
    chunk_size    u32       plaintext bytes per chunk, in [4096, 1 GiB]
    kek_id_len    u16       then kek_id (UTF-8)
    wrapped_len   u16       then the wrapped DEK

The DEK is wrapped with ``provider.wrap(dek, context=prefix)``, where ``prefix`` is every header
byte before ``wrapped_len``; so the header is authenticated by the wrap.

Chunks follow the header, each ``u32 ciphertext length || ciphertext with 16-byte tag``. Every
chunk but the last holds exactly ``chunk_size`` plaintext bytes; an empty plaintext has one empty
last chunk. A chunk is sealed with ``AESGCM(dek)``:

    nonce = 4 zero bytes || u64 chunk index   (the DEK is fresh per file: nonces never repeat)
    aad   = file_id || u64 chunk index || u8 last flag (1 for the final chunk)

so swapped, dropped or appended chunks fail authentication, and so does a file cut short at a
chunk boundary.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from shared.errors import ModelLoadError
from shared.keys import KeyProvider, KeyUnwrapError

MAGIC = b"SVENC\x00"
FORMAT_VERSION = 1
FILE_ID_SIZE = 16
MIN_CHUNK_SIZE = 4096
MAX_CHUNK_SIZE = 1 << 30
DEFAULT_CHUNK_SIZE = 4 * 1024 * 1024
TAG_SIZE = 16

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_NONCE = struct.Struct(">4xQ")
_AAD_TAIL = struct.Struct(">QB")
_FIXED = struct.Struct(f">{len(MAGIC)}sH{FILE_ID_SIZE}sI")


class DecryptionError(ModelLoadError):
    """An encrypted file cannot be opened: not this format, wrong KEK, tampered or truncated."""


@dataclass(frozen=True)
class EncryptedFileInfo:
    """What the header of an encrypted file says."""

    file_id: str
    kek_id: str
    chunk_size: int
    version: int


@dataclass(frozen=True)
class _Header:
    info: EncryptedFileInfo
    file_id: bytes
    prefix: bytes
    wrapped: bytes
    end: int


def _header_prefix(file_id: bytes, chunk_size: int, kek_id: str) -> bytes:
    kek_id_bytes = kek_id.encode("utf-8")
    if len(kek_id_bytes) > 0xFFFF:
        raise ValueError("kek_id is too long")
    fixed = _FIXED.pack(MAGIC, FORMAT_VERSION, file_id, chunk_size)
    return fixed + _U16.pack(len(kek_id_bytes)) + kek_id_bytes


def _header(prefix: bytes, wrapped: bytes) -> bytes:
    if len(wrapped) > 0xFFFF:
        raise ValueError("the wrapped data key is too long")
    return prefix + _U16.pack(len(wrapped)) + wrapped


def _seal_params(file_id: bytes, index: int, last: bool) -> tuple[bytes, bytes]:
    return _NONCE.pack(index), file_id + _AAD_TAIL.pack(index, 1 if last else 0)


def _check_chunk_size(chunk_size: int) -> None:
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise ValueError(
            f"chunk_size must be in [{MIN_CHUNK_SIZE}, {MAX_CHUNK_SIZE}], got {chunk_size}"
        )


def encrypt_stream(
    plaintext: bytes | memoryview,
    out: BinaryIO,
    provider: KeyProvider,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    progress: Callable[[int], None] | None = None,
) -> EncryptedFileInfo:
    """Encrypt ``plaintext`` under a fresh data key wrapped by ``provider``; write it to ``out``.

    ``progress(n)`` is called after each chunk with the ``n`` plaintext bytes that chunk held,
    so the calls sum to ``len(plaintext)``.
    """
    _check_chunk_size(chunk_size)
    view = memoryview(plaintext).cast("B")
    file_id = os.urandom(FILE_ID_SIZE)
    dek = AESGCM.generate_key(bit_length=256)
    prefix = _header_prefix(file_id, chunk_size, provider.kek_id)
    out.write(_header(prefix, provider.wrap(dek, prefix)))
    aead = AESGCM(dek)
    total = len(view)
    count = max(1, -(-total // chunk_size))
    for index in range(count):
        start = index * chunk_size
        piece = view[start : start + chunk_size]
        nonce, aad = _seal_params(file_id, index, index == count - 1)
        sealed = aead.encrypt(nonce, piece, aad)
        out.write(_U32.pack(len(sealed)))
        out.write(sealed)
        if progress is not None:
            progress(len(piece))
    return EncryptedFileInfo(file_id.hex(), provider.kek_id, chunk_size, FORMAT_VERSION)


class _Reader:
    """Reads header fields from a buffer; running out means the header is truncated."""

    def __init__(self, view: memoryview) -> None:
        self.view = view
        self.pos = 0

    def take(self, n: int) -> memoryview:
        if len(self.view) - self.pos < n:
            raise DecryptionError("not a complete encrypted file: the header is truncated")
        piece = self.view[self.pos : self.pos + n]
        self.pos += n
        return piece

    def take_sized(self) -> memoryview:
        (n,) = _U16.unpack(self.take(_U16.size))
        return self.take(n)


def _parse_header(data: bytes | memoryview) -> _Header:
    view = memoryview(data).cast("B")
    head = bytes(view[: len(MAGIC)])
    if head != MAGIC:
        if len(head) < len(MAGIC) and MAGIC.startswith(head):
            raise DecryptionError("not a complete encrypted file: the header is truncated")
        raise DecryptionError("not a splitvault encrypted file (bad magic)")
    reader = _Reader(view)
    _, version, file_id, chunk_size = _FIXED.unpack(reader.take(_FIXED.size))
    if version != FORMAT_VERSION:
        raise DecryptionError(
            f"unsupported encrypted file version {version} (this build reads {FORMAT_VERSION})"
        )
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise DecryptionError(f"invalid chunk size {chunk_size}: the header was tampered with")
    try:
        kek_id = str(reader.take_sized(), "utf-8")
    except UnicodeDecodeError:
        raise DecryptionError("invalid KEK id: the header was tampered with") from None
    prefix_end = reader.pos
    wrapped = bytes(reader.take_sized())
    info = EncryptedFileInfo(file_id.hex(), kek_id, chunk_size, version)
    return _Header(info, file_id, bytes(view[:prefix_end]), wrapped, reader.pos)


def read_header(data: bytes | memoryview) -> EncryptedFileInfo:
    """Return what the header of an encrypted file says, without any key."""
    return _parse_header(data).info


def _unwrap_dek(header: _Header, provider: KeyProvider) -> bytes:
    try:
        return provider.unwrap(header.wrapped, header.prefix)
    except KeyUnwrapError:
        file_kek = header.info.kek_id
        if file_kek != provider.kek_id:
            raise DecryptionError(
                f"wrong key: the file was wrapped under KEK id {file_kek} while the configured "
                f"KEK id is {provider.kek_id}"
            ) from None
        raise DecryptionError(
            "the data key did not unwrap under the right KEK: header tampered"
        ) from None


def _open_chunk(aead: AESGCM, file_id: bytes, index: int, body: memoryview, last: bool) -> bytes:
    nonce, aad = _seal_params(file_id, index, last)
    try:
        return aead.decrypt(nonce, body, aad)
    except InvalidTag:
        pass
    # Tell a cut or padded file from a tampered chunk: does it open with the other last flag?
    nonce, aad = _seal_params(file_id, index, not last)
    try:
        aead.decrypt(nonce, body, aad)
    except InvalidTag:
        raise DecryptionError(
            f"chunk {index} failed authentication: the file was tampered with"
        ) from None
    if last:
        raise DecryptionError(f"file is truncated: the chunks after chunk {index} are missing")
    raise DecryptionError(f"unexpected extra data after the last chunk (chunk {index})")


def _decrypt_chunks(view: memoryview, header: _Header, dek: bytes) -> list[bytes]:
    aead = AESGCM(dek)
    max_len = header.info.chunk_size + TAG_SIZE
    pieces: list[bytes] = []
    pos, end = header.end, len(view)
    index = 0
    while True:
        if end - pos < _U32.size:
            raise DecryptionError(f"file is truncated: chunk {index} is missing")
        (length,) = _U32.unpack_from(view, pos)
        pos += _U32.size
        if not TAG_SIZE <= length <= max_len:
            raise DecryptionError(
                f"chunk {index} has an invalid length {length}: the file was tampered with"
            )
        if end - pos < length:
            raise DecryptionError(f"file is truncated: chunk {index} is cut short")
        body = view[pos : pos + length]
        pos += length
        last = pos == end
        pieces.append(_open_chunk(aead, header.file_id, index, body, last))
        if last:
            return pieces
        index += 1


def decrypt_bytes(data: bytes | memoryview, provider: KeyProvider) -> bytes:
    """Decrypt a whole encrypted file held in memory and return its plaintext.

    Raises ``DecryptionError`` with a readable reason if the file cannot be trusted.
    """
    view = memoryview(data).cast("B")
    header = _parse_header(view)
    dek = _unwrap_dek(header, provider)
    return b"".join(_decrypt_chunks(view, header, dek))


def rewrap(data: bytes | memoryview, old: KeyProvider, new: KeyProvider) -> bytes:
    """Return the file with its data key rewrapped from ``old``'s KEK to ``new``'s.

    Only the header changes: the data key, and so every chunk, stays the same.
    """
    view = memoryview(data).cast("B")
    header = _parse_header(view)
    dek = _unwrap_dek(header, old)
    info = header.info
    prefix = _header_prefix(header.file_id, info.chunk_size, new.kek_id)
    return b"".join((_header(prefix, new.wrap(dek, prefix)), view[header.end :]))
