"""Commands: ``owner keygen`` and ``sealed list|delete`` (sealed request bodies)."""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path


def add_sealing_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``owner`` and ``sealed`` to the ``splitvault`` parser."""
    owner = commands.add_parser("owner", help="the owner's key pair for sealed request bodies")
    actions = owner.add_subparsers(dest="action", required=True)
    keygen = actions.add_parser("keygen", help="new key pair: public to public/, private offline")
    keygen.add_argument("--deploy", required=True, type=Path, help="the deployment folder")
    keygen.add_argument(
        "--out", type=Path, help="private key file (default DEPLOY/owner/owner.key)"
    )
    keygen.set_defaults(run=_keygen)
    sealed = commands.add_parser("sealed", help="sealed request bodies kept by the public tier")
    actions = sealed.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="per API key: bodies, bytes, first and last")
    listing.add_argument("--deploy", required=True, type=Path)
    listing.set_defaults(run=_list)
    delete = actions.add_parser("delete", help="delete every sealed body of one API key")
    delete.add_argument("--deploy", required=True, type=Path)
    delete.add_argument("--key", required=True, help="API key id or name")
    delete.set_defaults(run=_delete)


def _keygen(args: argparse.Namespace) -> int:
    from splitvault.ownership.sealed import generate_owner_key

    private, public, key_id = generate_owner_key(args.deploy, args.out)
    print(f"owner key {key_id}: public key {public} (the public tier seals to it at start)")
    print(f"private key {private}: move it off both tiers; only it opens the sealed bodies")
    return 0


def _path(deploy: Path) -> Path:
    from public_api.sealed_store import SEALED_DB
    from public_api.settings import public_state_dir

    return public_state_dir(deploy) / SEALED_DB


def _when(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.UTC).isoformat(timespec="seconds")


def _list(args: argparse.Namespace) -> int:
    from public_api.sealed_store import summary

    print(f"{'key':<24} {'bodies':>8} {'bytes':>12}  first .. last")
    for key_id, rows, size, first, last in summary(_path(args.deploy)):
        print(f"{key_id or '(no key)':<24} {rows:>8,} {size:>12,}  {_when(first)} .. {_when(last)}")
    return 0


def _delete(args: argparse.Namespace) -> int:
    from public_api.sealed_store import delete_key
    from splitvault.ownership.evidence import key_section

    key_id = str(key_section(args.deploy, args.key)["key"]["key_id"])
    deleted = delete_key(_path(args.deploy), key_id)
    print(f"deleted {deleted} sealed bodies of API key {key_id}")
    return 0
