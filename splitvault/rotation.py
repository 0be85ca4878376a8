"""Key and certificate rotation: ``splitvault keys rotate-kek`` and ``splitvault certs rotate``.

``rotate_kek`` re-wraps the data key of every encrypted file under the private tier's folder
(found by the ``SVENC`` magic, so any encrypted file, not only weights) under a new KEK. Only
each file's header changes; the chunks, and so the weights, are not re-encrypted. It is safe to
interrupt and run again: the new KEK is stored (``kek.new``) before any file is touched, each
file is replaced atomically after it was checked to decrypt under the new KEK, a file already
under the new KEK is skipped, and the KEK file is replaced last.

``rotate_certificates`` issues new tier certificates from the deployment's CA with the same
names, subject alternative names and key usages, and new keys. Running tiers keep the
certificates they loaded; each picks up the new ones when it restarts, so replicas can be
restarted one at a time.
"""

from __future__ import annotations

import argparse
import base64
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shared.crypto import MAGIC, DecryptionError, decrypt_bytes, read_header, rewrap
from shared.keys import KEK_SIZE, LocalFileKeyProvider
from shared.layout import DeployLayout, TierDir
from splitvault.pki import CertKeyPair, issue_certificate

_HEADER_READ = 64 * 1024  # more than any header: magic, ids, sizes and a wrapped data key
TIER_CERTIFICATES = {"public": ("server", "client"), "private": ("server",)}


def write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Replace ``path`` with ``data`` (file ``mode``): a temp file, fsync, rename, fsync dir."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def encrypted_files(root: Path) -> list[Path]:
    """Every regular file under ``root`` that starts with the encrypted-file magic."""
    found = []
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            with path.open("rb") as f:
                if f.read(len(MAGIC)) == MAGIC:
                    found.append(path)
    return found


def _private_encrypted_files(layout: DeployLayout) -> list[Path]:
    """The encrypted files of the private tier's folder and of its state folder (the ledger's
    signing keys), which an operator may have put elsewhere."""
    from private_core.settings import private_state_dir  # the private tier's own resolution

    found = encrypted_files(layout.private.root)
    state = private_state_dir(layout.root)
    if state.is_dir() and not state.resolve().is_relative_to(layout.private.root.resolve()):
        found += encrypted_files(state)
    return found


@dataclass
class KekRotation:
    """What ``rotate_kek`` did."""

    kek_file: Path
    old_kek_id: str
    new_kek_id: str
    rewrapped: list[Path] = field(default_factory=list)
    already_rewrapped: list[Path] = field(default_factory=list)
    resumed: bool = False


def rotate_kek(
    layout: DeployLayout, *, kek_file: Path | None = None, new_kek_file: Path | None = None
) -> KekRotation:
    """Re-wrap every encrypted file under ``layout.private`` from the current KEK to a new one.

    The new KEK is read from ``new_kek_file`` (base64, as ``splitvault init`` writes it), taken
    from ``kek.new`` beside the KEK file (left by an interrupted run), or made at random.
    ``kek_file`` (default: the deployment's) is replaced by the new KEK at the end.
    """
    kek_path = kek_file or layout.kek
    pending = kek_path.with_name(kek_path.name + ".new")
    backup = kek_path.with_name(kek_path.name + ".old")
    old = LocalFileKeyProvider.load(kek_path)
    given = LocalFileKeyProvider.load(new_kek_file) if new_kek_file else None  # valid first
    resumed = pending.exists()
    if not resumed:
        text = base64.b64encode(os.urandom(KEK_SIZE)) + b"\n"
        write_atomic(pending, new_kek_file.read_bytes() if new_kek_file else text, 0o600)
    new = LocalFileKeyProvider.load(pending)
    if given is not None and given.kek_id != new.kek_id:
        raise ValueError(
            f"an interrupted rotation to KEK {new.kek_id} is pending in {pending}: "
            "run again without --new-kek-file to finish it"
        )
    if new.kek_id == old.kek_id:
        pending.unlink()
        raise ValueError(f"the new KEK is the current one (KEK id {old.kek_id})")
    if not backup.exists():  # the old KEK stays next to the new one until every file moved
        write_atomic(backup, kek_path.read_bytes(), 0o600)
    result = KekRotation(kek_path, old.kek_id, new.kek_id, resumed=resumed)
    for path in _private_encrypted_files(layout):
        if _rewrap_file(path, old, new):
            result.rewrapped.append(path)
        else:
            result.already_rewrapped.append(path)
    os.replace(pending, kek_path)
    _fsync_dir(kek_path.parent)
    backup.unlink()
    return result


def _rewrap_file(path: Path, old: LocalFileKeyProvider, new: LocalFileKeyProvider) -> bool:
    """Re-wrap one file in place; False when it already is under ``new``."""
    with path.open("rb") as f:
        kek_id = read_header(f.read(_HEADER_READ)).kek_id
    if kek_id == new.kek_id:
        return False
    if kek_id != old.kek_id:
        raise ValueError(
            f"{path} is wrapped under KEK {kek_id}, neither the current KEK {old.kek_id} "
            f"nor the new one {new.kek_id}"
        )
    data = path.read_bytes()
    try:
        rewrapped = rewrap(data, old, new)
        del data
        decrypt_bytes(rewrapped, new)  # every chunk authenticates under the new wrap
    except DecryptionError as error:
        raise ValueError(f"{path}: {error}") from None
    write_atomic(path, rewrapped, path.stat().st_mode & 0o777)
    return True


@dataclass(frozen=True)
class RotatedCertificate:
    """One certificate ``rotate_certificates`` replaced."""

    cert_path: Path
    key_path: Path
    pair: CertKeyPair


def rotate_certificates(
    layout: DeployLayout, ca: CertKeyPair, tiers: Sequence[str], *, valid_days: int = 397
) -> list[RotatedCertificate]:
    """Re-issue each certificate of ``tiers`` ("public", "private"; public: every replica's
    client identity too) from ``ca``, new keys and the same identity, names and usages, and
    write it in place of the old one."""
    rotated = []
    for tier in tiers:
        folder: TierDir = layout.public if tier == "public" else layout.private
        pairs = [
            (folder.tls / f"{name}.crt", folder.tls / f"{name}.key")
            for name in TIER_CERTIFICATES[tier]
        ]
        if tier == "public" and layout.public_replicas.is_dir():  # the other replicas' own
            pairs += [
                (path, path.with_name("client.key"))
                for path in sorted(layout.public_replicas.glob("*/client.crt"))
            ]
        for cert_path, key_path in pairs:
            old = x509.load_pem_x509_certificate(cert_path.read_bytes())
            pair = reissue(ca, old, valid_days=valid_days)
            _replace_together(
                [(key_path, pair.key_pem(), 0o600), (cert_path, pair.cert_pem(), 0o644)]
            )
            rotated.append(RotatedCertificate(cert_path, key_path, pair))
    return rotated


def _replace_together(files: Sequence[tuple[Path, bytes, int]]) -> None:
    """Write every file aside first, then rename them in quick succession."""
    staged = []
    for path, data, mode in files:
        aside = path.with_name(f".{path.name}.rotating")
        write_atomic(aside, data, mode)
        staged.append((aside, path))
    for aside, path in staged:
        os.replace(aside, path)
    for folder in {path.parent for _, path in staged}:
        _fsync_dir(folder)


def reissue(ca: CertKeyPair, old: x509.Certificate, *, valid_days: int) -> CertKeyPair:
    """A new certificate and key with ``old``'s common name, subject alternative names and
    server/client usages."""
    names = old.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names:
        raise ValueError(f"certificate {old.subject.rfc4514_string()} has no common name")
    try:
        san = old.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = san.get_values_for_type(x509.DNSName)
        ips = [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        dns, ips = [], []
    usages = old.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    return issue_certificate(
        ca,
        str(names[0].value),
        dns_names=dns,
        ip_addresses=ips,
        server=ExtendedKeyUsageOID.SERVER_AUTH in usages,
        client=ExtendedKeyUsageOID.CLIENT_AUTH in usages,
        valid_days=valid_days,
    )


def add_rotation_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``keys rotate-kek`` (to the ``keys`` group ``add_admin_commands`` made) and the
    ``certs rotate`` group."""
    keys = _subcommands(commands.choices["keys"])
    kek = keys.add_parser("rotate-kek", help="re-wrap every data key under a new KEK")
    kek.add_argument("--deploy", required=True, type=Path)
    kek.add_argument("--kek-file", type=Path, help="the current KEK (default: DEPLOY/secrets/kek)")
    kek.add_argument("--new-kek-file", type=Path, help="the new KEK, base64 (default: random)")
    kek.set_defaults(run=_rotate_kek)
    certs = commands.add_parser("certs", help="rotate the tiers' TLS certificates")
    actions = certs.add_subparsers(dest="action", required=True)
    rotate = actions.add_parser("rotate", help="issue new tier certificates from the CA")
    rotate.add_argument("--deploy", required=True, type=Path)
    rotate.add_argument("--tier", choices=["public", "private", "all"], default="all")
    rotate.add_argument("--valid-days", type=int, default=397, help="validity of the new ones")
    rotate.set_defaults(run=_rotate_certs)
    add = actions.add_parser(
        "add-public", help="issue a client identity for one more public replica"
    )
    add.add_argument("--deploy", required=True, type=Path)
    add.add_argument("--name", help="its CN (default: the next splitvault-public-N)")
    add.add_argument("--valid-days", type=int, default=397)
    add.set_defaults(run=_add_public)


def _subcommands(
    parser: argparse.ArgumentParser,
) -> argparse._SubParsersAction[argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    raise ValueError(f"{parser.prog} has no subcommands")


def _rotate_kek(args: argparse.Namespace) -> int:
    result = rotate_kek(
        DeployLayout(args.deploy), kek_file=args.kek_file, new_kek_file=args.new_kek_file
    )
    if result.resumed:
        print("resumed an interrupted rotation (found its new KEK)")
    print(f"KEK rotated: {result.old_kek_id} -> {result.new_kek_id}")
    for path in result.rewrapped:
        print(f"  re-wrapped   {path}")
    for path in result.already_rewrapped:
        print(f"  already new  {path}")
    print(f"new KEK written to {result.kek_file}; the old KEK opens none of these files.")
    print("Update the private tier's KEK secret with it, then restart each private replica.")
    return 0


def _add_public(args: argparse.Namespace) -> int:
    from splitvault.deploy import add_public_replica, load_ca

    layout = DeployLayout(args.deploy)
    name, folder = add_public_replica(
        layout, load_ca(layout), args.name, valid_days=args.valid_days
    )
    print(f"issued public identity {name}: {folder}/client.crt and client.key")
    print(
        "Give that folder to the new replica only (SPLITVAULT_PUBLIC_CLIENT_TLS_DIR); the "
        "private tier admits it by prefix (allowed_identity_prefixes) with budgets of its own."
    )
    return 0


def _rotate_certs(args: argparse.Namespace) -> int:
    from splitvault.deploy import load_ca

    layout = DeployLayout(args.deploy)
    tiers = ["public", "private"] if args.tier == "all" else [args.tier]
    for rotated in rotate_certificates(layout, load_ca(layout), tiers, valid_days=args.valid_days):
        cert = rotated.pair.cert
        print(
            f"issued {rotated.cert_path} ({cert.subject.rfc4514_string()}, serial "
            f"{cert.serial_number:x}, valid until {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC)"
        )
    print("Restart each tier, one replica at a time, to present the new certificates.")
    return 0
