"""``splitvault monitor show|clear|block|throttle``: extraction risk per key and per key group.

The public tier writes every key's latest assessment to ``DEPLOY/public/state/monitor.sqlite3``
(on a level change, else at most every few seconds), and its key groups after each group pass
(``show --groups``). ``clear`` leaves a request in that file; the serving tier picks it up
within ``MonitorConfig.clear_poll_s`` seconds (or when it next starts), resets the key's
statistics and lifts its block or throttle. ``block``, ``throttle`` and ``clear --group`` leave
an order the next group pass carries out on every member (or on one key).
"""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path

from public_api.monitor.group_log import GroupLog, read_groups
from public_api.monitor.store import SqliteAssessmentLog, read_assessments

__all__ = ["MONITOR_DB", "add_monitor_commands", "monitor_log_path", "read_assessments"]

MONITOR_DB = "monitor.sqlite3"


def monitor_log_path(deploy: Path) -> Path:
    """``monitor.sqlite3`` in the public tier's state folder (``DEPLOY/public/state`` unless its
    settings name another); ``FileNotFoundError`` if not a deployment."""
    from public_api.settings import public_state_dir

    return public_state_dir(deploy) / MONITOR_DB


def add_monitor_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``monitor show`` and ``monitor clear`` commands to the ``splitvault`` parser."""
    monitor = commands.add_parser("monitor", help="extraction risk per API key")
    actions = monitor.add_subparsers(dest="action", required=True)
    show = actions.add_parser("show", help="each key's score, level and reasons")
    show.add_argument("--deploy", required=True, type=Path)
    show.add_argument("--key", metavar="KEY_ID_OR_NAME", help="only this key")
    show.add_argument("--groups", action="store_true", help="key groups instead of keys")
    show.set_defaults(run=_show)
    for action, what in (
        ("clear", "reset the statistics of a key or a group's keys and lift a block"),
        ("block", "block a key or every key of a group (until cleared)"),
        ("throttle", "throttle a key or every key of a group (until cleared)"),
    ):
        command = actions.add_parser(action, help=what)
        command.add_argument("--deploy", required=True, type=Path)
        target = command.add_mutually_exclusive_group(required=True)
        target.add_argument("--key", metavar="KEY_ID_OR_NAME", help="an API key")
        target.add_argument("--group", metavar="GROUP_ID", help="a group from show --groups")
        # The positional form of earlier versions, kept working (same as --key).
        target.add_argument("key_arg", metavar="KEY_ID_OR_NAME", nargs="?", help=argparse.SUPPRESS)
        command.set_defaults(run=_clear if action == "clear" else _order, order=action)


def _key_id(args: argparse.Namespace) -> str | None:
    """The id of the key named by ``--key`` (or the positional form), by id or name;
    ``UnknownKey`` (the CLI's exit 2) for a key the key store does not hold."""
    from public_api.key_lookup import find_key
    from public_api.settings import public_state_dir

    given = args.key if args.key is not None else getattr(args, "key_arg", None)
    if given is None:
        return None
    return find_key(public_state_dir(args.deploy), given).key_id


def _show(args: argparse.Namespace) -> int:
    args.key = _key_id(args)
    if args.groups:
        return _show_groups(args)
    assessments = read_assessments(monitor_log_path(args.deploy), args.key)
    if not assessments:
        print("no assessments" + (f" for key {args.key}" if args.key else ""))
        return 0 if args.key is None else 1
    print(f"{'KEY':<16} {'SCORE':>5}  {'LEVEL':<9} {'QUERIES':>9}  UPDATED (UTC)")
    for item in assessments:
        when = dt.datetime.fromtimestamp(item.updated_at, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
        print(f"{item.key_id:<16} {item.score:>5.2f}  {item.level:<9} {item.queries:>9,}  {when}")
        for reason in item.reasons:
            print(f"    {reason}")
    return 0


def _show_groups(args: argparse.Namespace) -> int:
    groups = read_groups(monitor_log_path(args.deploy))
    if args.key is not None:
        groups = [group for group in groups if args.key in group.members]
    if not groups:
        print("no key groups" + (f" with key {args.key}" if args.key else ""))
        return 0
    print(f"{'GROUP':<14} {'SCORE':>5}  {'LEVEL':<9} {'QUERIES':>9} {'KEYS':>5}  UPDATED (UTC)")
    for group in groups:
        when = dt.datetime.fromtimestamp(group.updated_at, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
        print(
            f"{group.group_id:<14} {group.score:>5.2f}  {group.level:<9} {group.queries:>9,} "
            f"{len(group.members):>5}  {when}"
        )
        print(f"    members: {', '.join(group.members)}")
        for link in group.links:
            print(f"    link {link}")
        for reason in group.reasons:
            print(f"    {reason}")
    return 0


def _order(args: argparse.Namespace) -> int:
    path = monitor_log_path(args.deploy)
    if args.group is None:
        args.key = _key_id(args)
    members: tuple[str, ...] = (args.key,)
    if args.group is not None:
        found = [group for group in read_groups(path) if group.group_id == args.group]
        if not found:
            print(f"no key group {args.group} (see: splitvault monitor show --groups)")
            return 1
        members = found[0].members
    GroupLog(path).order(args.order, args.group or args.key, members)
    print(
        f"{args.order} ordered for {args.group or args.key} ({len(members)} key(s)): a running "
        "public tier applies it at its next group pass"
    )
    return 0


def _clear(args: argparse.Namespace) -> int:
    if args.group is not None:
        return _order(args)
    args.key = _key_id(args)
    SqliteAssessmentLog(monitor_log_path(args.deploy)).request_clear(args.key)
    print(
        f"clear requested for {args.key}: a running public tier applies it within seconds "
        "(a stopped one when it next serves)"
    )
    return 0
