"""``splitvault state migrate --from sqlite``: move a host's public-tier state into PostgreSQL."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_state_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``state`` command group to the ``splitvault`` parser."""
    state = commands.add_parser("state", help="the public tier's lasting state")
    actions = state.add_subparsers(dest="action", required=True)
    move = actions.add_parser(
        "migrate",
        help="move keys, terms acceptances, monitor decisions and the audit chain into "
        "PostgreSQL (stop the public tier first)",
    )
    move.add_argument("--from", dest="source", required=True, choices=["sqlite"])
    move.add_argument("--deploy", required=True, type=Path)
    move.add_argument(
        "--dsn-file",
        type=Path,
        help="a file holding the PostgreSQL DSN (default: the public tier's postgres_dsn_file)",
    )
    move.add_argument(
        "--replica",
        help="the replica that continues the moved audit chain (default: the public tier's "
        "replica_name, else the host name)",
    )
    move.set_defaults(run=_migrate)


def _migrate(args: argparse.Namespace) -> int:
    from public_api.pg_store import read_dsn
    from public_api.settings import public_state_dir
    from splitvault.state_access import configured_dsn
    from splitvault.state_migrate import default_replica, migrate_sqlite

    dsn = read_dsn(args.dsn_file) if args.dsn_file else configured_dsn(args.deploy, None)
    if dsn is None:
        raise ValueError("no PostgreSQL to move into: pass --dsn-file")
    state_dir = public_state_dir(args.deploy)
    moved = migrate_sqlite(state_dir, dsn, args.replica or default_replica(args.deploy))
    for line in moved.lines():
        print(line)
    return 0
