"""Operator commands: ``splitvault keys create|list|revoke`` and ``splitvault audit verify|export``.

Both work on the public tier's state folder (``DEPLOY/public/state/``, or the tier's
``state_dir`` setting, e.g. ``SPLITVAULT_PUBLIC_STATE_DIR`` in a container), and can run while the
tier serves: a key revoked here is refused by a running tier within its key cache lifetime.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from collections.abc import Sequence
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from splitvault.signers import add_signer_commands

if TYPE_CHECKING:  # the stores are imported when a command runs, keeping the CLI quick to start
    from public_api.keys import ApiKey, KeyStore


def add_admin_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``keys`` and ``audit`` command groups to the ``splitvault`` parser."""
    _add_keys(commands)
    _add_audit(commands)


def _add_keys(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keys = commands.add_parser("keys", help="create, list and revoke API keys")
    actions = keys.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="issue a key (its secret is printed once)")
    create.add_argument("--deploy", required=True, type=Path)
    _dsn_option(create)
    create.add_argument("--name", required=True)
    create.add_argument("--rate", type=float, help="samples per second (overrides the model's)")
    create.add_argument("--burst", type=int, help="burst, in samples (overrides the model's)")
    create.add_argument("--quota", type=int, help="samples per day (overrides the model's)")
    create.set_defaults(run=_keys_create)
    listing = actions.add_parser("list", help="every key, its limits and accepted terms")
    listing.add_argument("--deploy", required=True, type=Path)
    _dsn_option(listing)
    listing.set_defaults(run=_keys_list)
    revoke = actions.add_parser("revoke", help="revoke a key by id or name")
    revoke.add_argument("--deploy", required=True, type=Path)
    _dsn_option(revoke)
    revoke.add_argument("key", metavar="KEY_ID_OR_NAME")
    revoke.set_defaults(run=_keys_revoke)
    add_signer_commands(actions)  # signer-create, signer-register, signer-remove, signers


def _add_audit(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    audit = commands.add_parser("audit", help="verify and export the audit trail")
    actions = audit.add_subparsers(dest="action", required=True)
    verify = actions.add_parser("verify", help="check the hash chain (exit 1 if tampered)")
    verify.add_argument("--deploy", required=True, type=Path)
    verify.add_argument(
        "--anchors",
        type=Path,
        help="the private ledger's anchors (`splitvault ledger export-anchors` on the private "
        "host): records an anchor covers must match it",
    )
    verify.add_argument("--chain", help="the chain id the trail must have (default: its own)")
    _dsn_option(verify)
    verify.set_defaults(run=_audit_verify)
    export = actions.add_parser("export", help="one key's records as JSON lines")
    export.add_argument("--deploy", required=True, type=Path)
    export.add_argument("--key", required=True, metavar="KEY_ID_OR_NAME")
    export.add_argument("--out", type=Path, help="write to this file (default: stdout)")
    _dsn_option(export)
    export.set_defaults(run=_audit_export)


def state_dir(deploy: Path) -> Path:
    """The public tier's state folder (``DEPLOY/public/state`` unless its settings name
    another, as in the containers); ``FileNotFoundError`` if ``DEPLOY/public`` does not exist."""
    from public_api.settings import public_state_dir

    return public_state_dir(deploy)


def _dsn_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dsn-file",
        type=Path,
        help="a file holding the PostgreSQL DSN of the replicas' shared state (default: the "
        "public tier's state_backend and postgres_dsn_file settings)",
    )


def _key_store(args: argparse.Namespace) -> KeyStore:
    from splitvault.state_access import open_key_store

    return open_key_store(args.deploy, args.dsn_file)


def _audit_path(deploy: Path) -> Path:
    from public_api.audit import AUDIT_DB

    return state_dir(deploy) / AUDIT_DB


def _keys_create(args: argparse.Namespace) -> int:
    with closing(_key_store(args)) as store:
        key, secret = store.create(
            args.name, rate_per_s=args.rate, burst=args.burst, daily_quota=args.quota
        )
    print(f"created API key {key.key_id} (name {key.name!r}, limits: {_limits(key)})")
    print("secret, shown this once only (it is not stored and cannot be shown again):")
    print(f"  {secret}")
    return 0


def _keys_list(args: argparse.Namespace) -> int:
    with closing(_key_store(args)) as store:
        rows = [
            (
                key.key_id,
                key.name,
                _when(key.created_at),
                _when(key.revoked_at),
                _limits(key),
                store.accepted_version(key.key_id) or "-",
            )
            for key in store.list()
        ]
    if not rows:
        print("no API keys")
        return 0
    _print_table(("ID", "NAME", "CREATED", "REVOKED", "LIMITS", "TERMS"), rows)
    return 0


def _keys_revoke(args: argparse.Namespace) -> int:
    with closing(_key_store(args)) as store:
        try:
            key = store.revoke(args.key)
        except KeyError:
            print(f"splitvault: error: no API key with id or name {args.key!r}", file=sys.stderr)
            return 1
    print(f"revoked API key {key.key_id} (name {key.name!r}) at {_when(key.revoked_at)}")
    return 0


def _audit_verify(args: argparse.Namespace) -> int:
    from public_api.audit import head
    from public_api.audit_coverage import check_coverage
    from shared.anchors_file import AnchorsFile
    from splitvault.audit_pg_cli import verify_postgres
    from splitvault.state_access import configured_dsn

    anchors = None if args.anchors is None else AnchorsFile.read(args.anchors)
    dsn = configured_dsn(args.deploy, args.dsn_file)
    if dsn is not None:
        return verify_postgres(dsn, anchors, args.chain)
    path = _audit_path(args.deploy)
    coverage = check_coverage(path, anchors, args.chain)
    if not coverage.ok:
        print(f"audit trail {path} FAILED verification: {coverage.problems[0]}")
        for line in coverage.lines()[1:]:
            print(f"  {line}")
        return 1
    print(f"audit trail {path} OK: {coverage.records} records, chain intact")
    for line in coverage.lines():
        print(f"  {line}")
    seq, digest = head(path)
    print(f"head: record {seq}, hash {digest} (chain id {coverage.chain_id})")
    return 0


def _audit_export(args: argparse.Namespace) -> int:
    from public_api.key_lookup import find_in
    from splitvault.state_access import configured_dsn, open_key_store

    dsn = configured_dsn(args.deploy, args.dsn_file)
    with closing(open_key_store(args.deploy, args.dsn_file)) as store:
        key = find_in(store, args.key)  # UnknownKey (exit 2) if none
    path = _audit_path(args.deploy) if dsn is None else None
    if args.out is None:
        count = _write_any(path, dsn, key.key_id, sys.stdout)
        print(f"{count} records of {key.key_id} (name {key.name!r})", file=sys.stderr)
        return 0
    with args.out.open("w", encoding="utf-8") as out:
        count = _write_any(path, dsn, key.key_id, out)
    print(f"wrote {count} records of {key.key_id} (name {key.name!r}) to {args.out}")
    return 0


def _write_any(path: Path | None, dsn: str | None, key_id: str, out: TextIO) -> int:
    from splitvault.audit_pg_cli import export_postgres

    if dsn is not None:
        return export_postgres(dsn, key_id, out)
    assert path is not None
    return _write_lines(path, key_id, out)


def _write_lines(path: Path, key_id: str, out: TextIO) -> int:
    from public_api.audit import export_records

    count = 0
    for record in export_records(path, key_id):
        out.write(json.dumps(record, separators=(",", ":")) + "\n")
        count += 1
    return count


def _when(epoch: float | None) -> str:
    if epoch is None:
        return "-"
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _limits(key: ApiKey) -> str:
    parts = [
        f"rate={key.rate_per_s:g}/s" if key.rate_per_s is not None else "",
        f"burst={key.burst}" if key.burst is not None else "",
        f"quota={key.daily_quota}/day" if key.daily_quota is not None else "",
    ]
    return " ".join(part for part in parts if part) or "model defaults"


def _print_table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    for row in (header, *rows):
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
