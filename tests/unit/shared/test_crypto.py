"""Tests of the chunked AES-256-GCM file format, with real keys and real ciphertext."""

from __future__ import annotations

import io
import os
import struct

import pytest

from shared.crypto import (
    FORMAT_VERSION,
    MAGIC,
    DecryptionError,
    decrypt_bytes,
    encrypt_stream,
    read_header,
    rewrap,
)
from shared.errors import ModelLoadError
from shared.keys import LocalFileKeyProvider

CHUNK = 4096


@pytest.fixture
def kek() -> LocalFileKeyProvider:
    return LocalFileKeyProvider.from_bytes(os.urandom(32))


def _encrypt(plaintext: bytes, provider: LocalFileKeyProvider, chunk_size: int = CHUNK) -> bytes:
    out = io.BytesIO()
    encrypt_stream(plaintext, out, provider, chunk_size=chunk_size)
    return out.getvalue()


def _header_len(data: bytes) -> int:
    pos = len(MAGIC) + 2 + 16 + 4
    (kek_len,) = struct.unpack_from(">H", data, pos)
    pos += 2 + kek_len
    (wrapped_len,) = struct.unpack_from(">H", data, pos)
    return int(pos + 2 + wrapped_len)


def _chunks(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of each chunk record, length prefix included."""
    spans, pos = [], _header_len(data)
    while pos < len(data):
        (length,) = struct.unpack_from(">I", data, pos)
        spans.append((pos, pos + 4 + length))
        pos += 4 + length
    return spans


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, 5 * CHUNK + 123])
def test_round_trip(kek: LocalFileKeyProvider, size: int) -> None:
    plaintext = os.urandom(size)
    out = io.BytesIO()
    info = encrypt_stream(plaintext, out, kek, chunk_size=CHUNK)
    data = out.getvalue()
    assert decrypt_bytes(data, kek) == plaintext
    assert len(_chunks(data)) == max(1, -(-size // CHUNK))
    assert read_header(data) == info
    assert info.kek_id == kek.kek_id and info.chunk_size == CHUNK
    assert info.version == FORMAT_VERSION and len(bytes.fromhex(info.file_id)) == 16
    if size >= 64:
        assert plaintext[:64] not in data


def test_accepts_memoryview_and_default_chunk_size(kek: LocalFileKeyProvider) -> None:
    plaintext = os.urandom(10_000)
    out = io.BytesIO()
    info = encrypt_stream(memoryview(plaintext), out, kek)
    assert info.chunk_size == 4 * 1024 * 1024
    assert decrypt_bytes(out.getvalue(), kek) == plaintext


def test_same_plaintext_encrypts_differently(kek: LocalFileKeyProvider) -> None:
    plaintext = b"weights" * 1000
    first, second = _encrypt(plaintext, kek), _encrypt(plaintext, kek)
    assert first != second
    assert read_header(first).file_id != read_header(second).file_id


@pytest.mark.parametrize("chunk_size", [0, 4095, (1 << 30) + 1])
def test_rejects_chunk_size_out_of_range(kek: LocalFileKeyProvider, chunk_size: int) -> None:
    with pytest.raises(ValueError, match="chunk_size"):
        encrypt_stream(b"x", io.BytesIO(), kek, chunk_size=chunk_size)


def test_progress_sums_to_plaintext_size(kek: LocalFileKeyProvider) -> None:
    calls: list[int] = []
    encrypt_stream(
        os.urandom(3 * CHUNK + 10), io.BytesIO(), kek, chunk_size=CHUNK, progress=calls.append
    )
    assert calls == [CHUNK, CHUNK, CHUNK, 10]
    assert sum(calls) == 3 * CHUNK + 10


def test_flipped_byte_in_a_chunk_is_detected(kek: LocalFileKeyProvider) -> None:
    data = bytearray(_encrypt(os.urandom(3 * CHUNK), kek))
    start, end = _chunks(bytes(data))[1]
    data[(start + 4 + end) // 2] ^= 0x01
    with pytest.raises(
        DecryptionError, match="chunk 1 failed authentication: the file was tampered"
    ):
        decrypt_bytes(bytes(data), kek)


def test_flipped_byte_in_the_header_is_detected(kek: LocalFileKeyProvider) -> None:
    data = bytearray(_encrypt(b"secret weights", kek))
    data[len(MAGIC) + 2 + 3] ^= 0x01  # inside file_id
    with pytest.raises(DecryptionError, match="header tampered"):
        decrypt_bytes(bytes(data), kek)


def test_every_single_bit_flip_is_rejected(kek: LocalFileKeyProvider) -> None:
    data = _encrypt(os.urandom(CHUNK + 100), kek)
    for pos in range(len(data)):
        tampered = bytearray(data)
        tampered[pos] ^= 0x80
        with pytest.raises(DecryptionError):
            decrypt_bytes(bytes(tampered), kek)


def test_bad_magic_and_version(kek: LocalFileKeyProvider) -> None:
    data = _encrypt(b"x", kek)
    with pytest.raises(DecryptionError, match="bad magic"):
        decrypt_bytes(b"PK\x03\x04" + data[4:], kek)
    bumped = data[: len(MAGIC)] + struct.pack(">H", 2) + data[len(MAGIC) + 2 :]
    with pytest.raises(DecryptionError, match="version 2"):
        decrypt_bytes(bumped, kek)


@pytest.mark.parametrize("cut", [0, 3, len(MAGIC) + 1, 30])
def test_truncated_header(kek: LocalFileKeyProvider, cut: int) -> None:
    data = _encrypt(b"x", kek)
    with pytest.raises(DecryptionError, match="header is truncated"):
        read_header(data[:cut])


def test_truncation_at_a_chunk_boundary(kek: LocalFileKeyProvider) -> None:
    data = _encrypt(os.urandom(3 * CHUNK), kek)
    spans = _chunks(data)
    for _, end in spans[:-1]:
        with pytest.raises(DecryptionError, match="file is truncated"):
            decrypt_bytes(data[:end], kek)
    with pytest.raises(DecryptionError, match="file is truncated"):
        decrypt_bytes(data[: _header_len(data)], kek)


def test_truncation_mid_chunk(kek: LocalFileKeyProvider) -> None:
    data = _encrypt(os.urandom(3 * CHUNK), kek)
    start, end = _chunks(data)[2]
    for cut in (start + 2, start + 10, end - 1):
        with pytest.raises(DecryptionError, match="file is truncated"):
            decrypt_bytes(data[:cut], kek)


def test_swapped_chunks_fail_authentication(kek: LocalFileKeyProvider) -> None:
    data = _encrypt(os.urandom(3 * CHUNK), kek)
    (s0, e0), (s1, e1), _ = _chunks(data)
    swapped = data[:s0] + data[s1:e1] + data[s0:e0] + data[e1:]
    assert len(swapped) == len(data)
    with pytest.raises(DecryptionError, match="chunk 0 failed authentication"):
        decrypt_bytes(swapped, kek)


def test_extra_chunk_appended(kek: LocalFileKeyProvider) -> None:
    data = _encrypt(os.urandom(2 * CHUNK + 5), kek)
    start, end = _chunks(data)[-1]
    with pytest.raises(DecryptionError, match="after the last chunk"):
        decrypt_bytes(data + data[start:end], kek)
    with pytest.raises(DecryptionError, match="after the last chunk"):
        decrypt_bytes(data + struct.pack(">I", 16) + bytes(16), kek)


def test_chunk_from_another_file_is_rejected(kek: LocalFileKeyProvider) -> None:
    plaintext = os.urandom(2 * CHUNK)
    first, second = _encrypt(plaintext, kek), _encrypt(plaintext, kek)
    start, end = _chunks(first)[0]
    s2, e2 = _chunks(second)[0]
    spliced = first[:start] + second[s2:e2] + first[end:]
    with pytest.raises(DecryptionError, match="chunk 0 failed authentication"):
        decrypt_bytes(spliced, kek)


def test_wrong_kek_names_both_ids(kek: LocalFileKeyProvider) -> None:
    other = LocalFileKeyProvider.from_bytes(os.urandom(32))
    data = _encrypt(b"secret", kek)
    with pytest.raises(DecryptionError) as caught:
        decrypt_bytes(data, other)
    message = str(caught.value)
    assert kek.kek_id in message and other.kek_id in message
    assert message.index(kek.kek_id) < message.index(other.kek_id)
    assert isinstance(caught.value, ModelLoadError)


def test_rewrap_moves_the_file_to_the_new_kek(kek: LocalFileKeyProvider) -> None:
    new = LocalFileKeyProvider.from_bytes(os.urandom(32))
    plaintext = os.urandom(2 * CHUNK + 7)
    data = _encrypt(plaintext, kek)
    rewrapped = rewrap(data, kek, new)
    old_header, new_header = _header_len(data), _header_len(rewrapped)
    assert rewrapped[new_header:] == data[old_header:]
    info = read_header(rewrapped)
    assert info.kek_id == new.kek_id
    assert info.file_id == read_header(data).file_id
    assert decrypt_bytes(rewrapped, new) == plaintext
    with pytest.raises(DecryptionError, match=kek.kek_id):
        decrypt_bytes(rewrapped, kek)


def test_rewrap_with_the_wrong_old_kek_fails(kek: LocalFileKeyProvider) -> None:
    stranger = LocalFileKeyProvider.from_bytes(os.urandom(32))
    data = _encrypt(b"x", kek)
    with pytest.raises(DecryptionError, match=stranger.kek_id):
        rewrap(data, stranger, stranger)
