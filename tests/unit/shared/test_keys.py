"""Tests of the local key-encryption-key provider."""

from __future__ import annotations

import base64
import stat
from pathlib import Path

import pytest

from shared.keys import KeyProvider, KeyUnwrapError, LocalFileKeyProvider, kek_id_of


def test_create_writes_private_base64_key_and_load_reads_it(tmp_path: Path) -> None:
    path = tmp_path / "secrets" / "kek"
    created = LocalFileKeyProvider.create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(base64.b64decode(path.read_text().strip(), validate=True)) == 32
    loaded = LocalFileKeyProvider.load(path)
    assert loaded.kek_id == created.kek_id
    wrapped = created.wrap(b"k" * 32, b"ctx")
    assert loaded.unwrap(wrapped, b"ctx") == b"k" * 32


def test_create_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "kek"
    LocalFileKeyProvider.create(path)
    before = path.read_bytes()
    with pytest.raises(FileExistsError):
        LocalFileKeyProvider.create(path)
    assert path.read_bytes() == before


@pytest.mark.parametrize(
    "content",
    [
        "not base64 at all!",
        base64.b64encode(b"short").decode(),
        "",
        base64.b64encode(bytes(33)).decode(),
    ],
)
def test_load_rejects_a_file_that_is_not_a_32_byte_key(tmp_path: Path, content: str) -> None:
    path = tmp_path / "kek"
    path.write_text(content)
    with pytest.raises(ValueError, match="32"):
        LocalFileKeyProvider.load(path)


def test_from_bytes_rejects_wrong_length() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        LocalFileKeyProvider.from_bytes(bytes(16))


def test_kek_id_is_stable_distinct_and_not_the_key() -> None:
    kek = bytes(range(32))
    provider = LocalFileKeyProvider.from_bytes(kek)
    assert provider.kek_id == kek_id_of(kek)
    assert len(provider.kek_id) == 16
    assert int(provider.kek_id, 16) >= 0
    assert provider.kek_id != LocalFileKeyProvider.from_bytes(bytes(32)).kek_id
    assert kek.hex()[:16] not in provider.kek_id


def test_wrap_is_randomised_and_round_trips() -> None:
    provider = LocalFileKeyProvider.from_bytes(bytes(range(32)))
    first, second = provider.wrap(b"d" * 32, b"ctx"), provider.wrap(b"d" * 32, b"ctx")
    assert first != second
    assert len(first) == 12 + 32 + 16
    assert provider.unwrap(first, b"ctx") == provider.unwrap(second, b"ctx") == b"d" * 32


def test_unwrap_fails_with_other_kek_other_context_or_tampering() -> None:
    provider = LocalFileKeyProvider.from_bytes(bytes(range(32)))
    other = LocalFileKeyProvider.from_bytes(bytes(32))
    wrapped = provider.wrap(b"d" * 32, b"ctx")
    with pytest.raises(KeyUnwrapError):
        other.unwrap(wrapped, b"ctx")
    with pytest.raises(KeyUnwrapError):
        provider.unwrap(wrapped, b"other context")
    tampered = bytearray(wrapped)
    tampered[20] ^= 1
    with pytest.raises(KeyUnwrapError):
        provider.unwrap(bytes(tampered), b"ctx")
    with pytest.raises(KeyUnwrapError):
        provider.unwrap(wrapped[:20], b"ctx")


def test_repr_shows_only_the_kek_id() -> None:
    kek = bytes(range(32))
    provider = LocalFileKeyProvider.from_bytes(kek)
    text = repr(provider)
    assert provider.kek_id in text
    assert kek.hex() not in text and base64.b64encode(kek).decode() not in text
    assert str(kek) not in text


def test_local_provider_satisfies_the_protocol() -> None:
    provider: KeyProvider = LocalFileKeyProvider.from_bytes(bytes(32))
    assert provider.unwrap(provider.wrap(b"x", b""), b"") == b"x"
