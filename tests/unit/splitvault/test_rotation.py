"""``splitvault keys rotate-kek`` and ``splitvault certs rotate`` on real deployment folders."""

from __future__ import annotations

import io
import os
import struct
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from shared.crypto import DecryptionError, decrypt_bytes, encrypt_stream
from shared.keys import LocalFileKeyProvider
from shared.layout import DeployLayout
from splitvault.cli import main
from splitvault.deploy import init_deployment, load_ca
from splitvault.pki import CertKeyPair
from splitvault.rotation import encrypted_files, rotate_certificates, rotate_kek

CHUNK = 4096


@pytest.fixture
def layout(tmp_path: Path) -> DeployLayout:
    return init_deployment(tmp_path / "deploy")


def _encrypt(path: Path, plaintext: bytes, provider: LocalFileKeyProvider) -> None:
    out = io.BytesIO()
    encrypt_stream(plaintext, out, provider, chunk_size=CHUNK)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(out.getvalue())


@pytest.fixture
def files(layout: DeployLayout) -> dict[Path, bytes]:
    """Two encrypted back stages, an encrypted file elsewhere in private/, plain files."""
    provider = LocalFileKeyProvider.load(layout.kek)
    plain = {
        layout.private.model("a") / "back.pt2.enc": os.urandom(3 * CHUNK + 17),
        layout.private.model("b") / "back.pt2.enc": os.urandom(100),
        layout.private.root / "watermark" / "key.enc": os.urandom(32),
    }
    for path, data in plain.items():
        _encrypt(path, data, provider)
    (layout.private.model("a") / "config.json").write_text("{}")
    return plain


def _split(data: bytes) -> tuple[bytes, bytes]:
    """(header, chunks) of an encrypted file, per the format in shared/crypto.py."""
    pos = 6 + 2 + 16 + 4
    for _ in range(2):  # the KEK id, then the wrapped data key, each u16-length-prefixed
        (length,) = struct.unpack_from(">H", data, pos)
        pos += 2 + length
    return data[:pos], data[pos:]


def test_finds_encrypted_files_by_their_magic(
    layout: DeployLayout, files: dict[Path, bytes]
) -> None:
    assert encrypted_files(layout.private.root) == sorted(files)


def test_rotation_rewraps_every_file_and_changes_only_headers(
    layout: DeployLayout, files: dict[Path, bytes]
) -> None:
    old = LocalFileKeyProvider.load(layout.kek)
    before = {path: path.read_bytes() for path in files}
    result = rotate_kek(layout)
    new = LocalFileKeyProvider.load(layout.kek)
    assert (result.old_kek_id, result.new_kek_id) == (old.kek_id, new.kek_id)
    assert new.kek_id != old.kek_id
    assert sorted(result.rewrapped) == sorted(files)
    for path, plaintext in files.items():
        after = path.read_bytes()
        old_header, old_chunks = _split(before[path])
        new_header, new_chunks = _split(after)
        assert new_chunks == old_chunks, "chunk ciphertexts must not change"
        assert new_header[:28] == old_header[:28]  # magic, version, file id, chunk size
        assert new_header != old_header
        assert decrypt_bytes(after, new) == plaintext
        with pytest.raises(DecryptionError, match="wrong key"):
            decrypt_bytes(after, old)
    assert (layout.private.model("a") / "config.json").read_text() == "{}"
    assert sorted(p.name for p in layout.kek.parent.iterdir()) == ["kek"]
    assert layout.kek.stat().st_mode & 0o777 == 0o600


def test_rotation_rewraps_the_ledger_key_in_a_state_folder_elsewhere(
    layout: DeployLayout, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from private_core.anchors import AnchorBook, signing_key_path
    from private_core.ledger import Ledger

    state = tmp_path / "state-volume"
    monkeypatch.setenv("SPLITVAULT_PRIVATE_STATE_DIR", str(state))
    ledger = Ledger.open(state, "replica-0")
    book = AnchorBook.open(ledger, LocalFileKeyProvider.load(layout.kek))
    ledger.close()
    result = rotate_kek(layout)
    assert signing_key_path(ledger) in result.rewrapped
    reopened = Ledger.open(state, "replica-0")
    try:
        after = AnchorBook.open(reopened, LocalFileKeyProvider.load(layout.kek))
        assert after.key_id == book.key_id
    finally:
        reopened.close()


def test_new_kek_may_be_given(
    layout: DeployLayout, files: dict[Path, bytes], tmp_path: Path
) -> None:
    given = tmp_path / "given-kek"
    LocalFileKeyProvider.create(given)
    rotate_kek(layout, new_kek_file=given)
    assert layout.kek.read_bytes() == given.read_bytes()
    provider = LocalFileKeyProvider.load(given)
    assert all(decrypt_bytes(p.read_bytes(), provider) == data for p, data in files.items())


def test_the_current_kek_is_refused_as_the_new_one(
    layout: DeployLayout, files: dict[Path, bytes]
) -> None:
    before = {path: path.read_bytes() for path in files}
    with pytest.raises(ValueError, match="is the current one"):
        rotate_kek(layout, new_kek_file=layout.kek)
    assert {path: path.read_bytes() for path in files} == before
    assert sorted(p.name for p in layout.kek.parent.iterdir()) == ["kek"]


def test_interrupted_rotation_resumes_with_the_same_new_kek(
    layout: DeployLayout, files: dict[Path, bytes]
) -> None:
    # A file under a foreign KEK stops the run after the files sorted before it moved.
    stray = layout.private.model("aa") / "back.pt2.enc"
    _encrypt(stray, b"x", LocalFileKeyProvider.from_bytes(os.urandom(32)))
    old_kek = layout.kek.read_bytes()
    with pytest.raises(ValueError, match="neither the current KEK"):
        rotate_kek(layout)
    assert layout.kek.read_bytes() == old_kek  # the KEK is replaced only at the end
    pending = LocalFileKeyProvider.load(layout.kek.with_name("kek.new"))
    first = layout.private.model("a") / "back.pt2.enc"
    assert decrypt_bytes(first.read_bytes(), pending) == files[first]
    stray.unlink()
    result = rotate_kek(layout)
    assert result.resumed and result.new_kek_id == pending.kek_id
    assert result.already_rewrapped == [first]
    new = LocalFileKeyProvider.load(layout.kek)
    assert all(decrypt_bytes(p.read_bytes(), new) == data for p, data in files.items())
    assert sorted(p.name for p in layout.kek.parent.iterdir()) == ["kek"]


def test_a_tampered_file_is_not_replaced(layout: DeployLayout, files: dict[Path, bytes]) -> None:
    target = layout.private.model("b") / "back.pt2.enc"
    data = bytearray(target.read_bytes())
    data[-1] ^= 1
    target.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="failed authentication"):
        rotate_kek(layout)
    assert target.read_bytes() == bytes(data)


def test_cli_prints_what_it_did(
    layout: DeployLayout, files: dict[Path, bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    old_id = LocalFileKeyProvider.load(layout.kek).kek_id
    assert main(["keys", "rotate-kek", "--deploy", str(layout.root)]) == 0
    out = capsys.readouterr().out
    new_id = LocalFileKeyProvider.load(layout.kek).kek_id
    assert f"KEK rotated: {old_id} -> {new_id}" in out
    assert all(f"re-wrapped   {path}" in out for path in files)
    assert layout.kek.read_text().strip() not in out


def _usages(cert: x509.Certificate) -> set[x509.ObjectIdentifier]:
    return set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def _sans(cert: x509.Certificate) -> list[x509.GeneralName]:
    return list(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)


@pytest.mark.parametrize(
    ("tier", "names"),
    [("public", ["server", "client"]), ("private", ["server"])],
)
def test_certificates_are_reissued_with_the_same_identity(
    layout: DeployLayout, tier: str, names: list[str]
) -> None:
    folder = layout.public if tier == "public" else layout.private
    old = {n: CertKeyPair.load(folder.tls / f"{n}.crt", folder.tls / f"{n}.key") for n in names}
    other = layout.private if tier == "public" else layout.public
    untouched = {p: p.read_bytes() for p in other.tls.iterdir()}
    ca = load_ca(layout)
    rotated = rotate_certificates(layout, ca, [tier], valid_days=10)
    assert [r.cert_path.name for r in rotated] == [f"{n}.crt" for n in names]
    for name, before in old.items():
        after = CertKeyPair.load(folder.tls / f"{name}.crt", folder.tls / f"{name}.key")
        assert after.cert.subject == before.cert.subject
        assert after.cert.serial_number != before.cert.serial_number
        assert after.cert.public_key() != before.cert.public_key()
        assert _usages(after.cert) == _usages(before.cert)
        if name == "server":
            assert _sans(after.cert) == _sans(before.cert)
        after.cert.verify_directly_issued_by(ca.cert)
        days = (after.cert.not_valid_after_utc - after.cert.not_valid_before_utc).days
        assert days == 10
        assert (folder.tls / f"{name}.key").stat().st_mode & 0o777 == 0o600
    assert {p: p.read_bytes() for p in other.tls.iterdir()} == untouched
    assert not [p for p in folder.tls.iterdir() if p.name.startswith(".")]


def test_private_certificate_keeps_both_usages(layout: DeployLayout) -> None:
    rotate_certificates(layout, load_ca(layout), ["private"])
    cert = x509.load_pem_x509_certificate((layout.private.tls / "server.crt").read_bytes())
    assert _usages(cert) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}


def test_certs_rotate_cli(layout: DeployLayout, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["certs", "rotate", "--deploy", str(layout.root)]) == 0
    out = capsys.readouterr().out
    assert out.count("issued ") == 3
    assert "CN=splitvault-public" in out and "CN=splitvault-private" in out


def test_certs_rotate_without_a_ca_fails_clearly(
    layout: DeployLayout, capsys: pytest.CaptureFixture[str]
) -> None:
    (layout.ca / "ca.key").unlink()
    assert main(["certs", "rotate", "--deploy", str(layout.root), "--tier", "public"]) == 2
    assert "ca.key" in capsys.readouterr().err


def test_an_invalid_new_kek_changes_nothing(
    layout: DeployLayout, files: dict[Path, bytes], tmp_path: Path
) -> None:
    bad = tmp_path / "bad-kek"
    bad.write_text("not a key\n")
    with pytest.raises(ValueError, match="base64"):
        rotate_kek(layout, new_kek_file=bad)
    assert sorted(p.name for p in layout.kek.parent.iterdir()) == ["kek"]


def test_a_pending_rotation_is_not_switched_to_another_kek(
    layout: DeployLayout, files: dict[Path, bytes], tmp_path: Path
) -> None:
    LocalFileKeyProvider.create(layout.kek.with_name("kek.new"))
    other = tmp_path / "other-kek"
    LocalFileKeyProvider.create(other)
    with pytest.raises(ValueError, match="interrupted rotation"):
        rotate_kek(layout, new_kek_file=other)
    old = LocalFileKeyProvider.load(layout.kek)
    assert all(decrypt_bytes(p.read_bytes(), old) == data for p, data in files.items())
