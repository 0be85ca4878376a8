"""``splitvault ledger export-anchors|show``: the private ledger, on the private host."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_ledger_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``ledger`` command group to the ``splitvault`` parser."""
    ledger = commands.add_parser("ledger", help="the private tier's ledger (audit anchors)")
    actions = ledger.add_subparsers(dest="action", required=True)
    export = actions.add_parser(
        "export-anchors", help="write the ledger's audit anchors, for `audit verify --anchors`"
    )
    _where(export)
    export.add_argument("--out", required=True, type=Path, help="the anchors file to write")
    export.set_defaults(run=_export)
    show = actions.add_parser("show", help="each replica's segment: records, keys, anchors")
    _where(show)
    show.set_defaults(run=_show)


def _where(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--deploy", required=True, type=Path)
    parser.add_argument(
        "--state",
        action="append",
        type=Path,
        help="a private state folder (repeat; default: the deployment's private state_dir)",
    )


def _state_dirs(args: argparse.Namespace) -> list[Path]:
    from private_core.settings import private_state_dir

    return list(args.state or [private_state_dir(args.deploy)])


def _export(args: argparse.Namespace) -> int:
    from private_core.ledger import LedgerCorrupt
    from private_core.ledger_export import export_anchors

    try:
        anchors = export_anchors(_state_dirs(args))
    except LedgerCorrupt as error:
        print(f"splitvault: ledger segment corrupt, nothing exported: {error}")
        return 1
    anchors.write(args.out)
    total = sum(len(replica.anchors) for replica in anchors.replicas)
    names = ", ".join(replica.replica_id for replica in anchors.replicas)
    print(
        f"wrote {total} anchors of {len(anchors.replicas)} ledger segments ({names}) to {args.out}"
    )
    return 0


def _show(args: argparse.Namespace) -> int:
    from private_core.ledger import LedgerCorrupt
    from private_core.ledger_export import ledger_segments, replica_anchors

    status = 0
    for path in [p for state in _state_dirs(args) for p in ledger_segments(state)]:
        try:
            replica = replica_anchors(path)
        except LedgerCorrupt as error:
            print(f"{path}: CORRUPT: {error}")
            status = 1
            continue
        chains = sorted({anchor.chain_id for anchor in replica.anchors})
        print(
            f"{path}: {replica.ledger_records} records, head {replica.ledger_head[:16]}..., "
            f"signing keys {', '.join(replica.keys) or '-'}, {len(replica.anchors)} anchors "
            f"of {len(chains)} audit chains"
        )
        for chain in chains:
            last = max(a.seq for a in replica.anchors if a.chain_id == chain)
            print(f"  chain {chain}: anchored through record {last}")
    return status
