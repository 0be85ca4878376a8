"""``splitvault monitor show|clear``: each key's extraction risk, read from the public tier's log.

The public tier writes every key's latest assessment to ``DEPLOY/public/state/monitor.sqlite3``
(on a level change, else at most every few seconds). ``clear`` leaves a request in that file;
the serving tier picks it up within ``MonitorConfig.clear_poll_s`` seconds (or when it next
starts), resets the key's statistics and lifts its block or throttle.
"""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path

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
    show.add_argument("--key", metavar="KEY_ID", help="only this key")
    show.set_defaults(run=_show)
    clear = actions.add_parser("clear", help="reset a key's statistics and lift a block")
    clear.add_argument("--deploy", required=True, type=Path)
    clear.add_argument("key", metavar="KEY_ID")
    clear.set_defaults(run=_clear)


def _show(args: argparse.Namespace) -> int:
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


def _clear(args: argparse.Namespace) -> int:
    SqliteAssessmentLog(monitor_log_path(args.deploy)).request_clear(args.key)
    print(
        f"clear requested for {args.key}: a running public tier applies it within seconds "
        "(a stopped one when it next serves)"
    )
    return 0
