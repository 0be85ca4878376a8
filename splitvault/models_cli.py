"""``splitvault models list|show|set-policy|delete``: both tiers' copies of a model at once."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from shared.layout import DeployLayout

if TYPE_CHECKING:  # imported when a command runs, keeping the CLI quick to start
    from shared.manifest import ModelConfig
    from splitvault.model_admin import ModelCopy

RESTART = "restart both tiers to apply it (each reads its models at start)"


def add_models_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``models`` command group to the ``splitvault`` parser."""
    models = commands.add_parser("models", help="list, inspect, re-police and delete models")
    actions = models.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="every model, both tiers' copies and problems")
    listing.add_argument("--deploy", required=True, type=Path)
    listing.set_defaults(run=_list)
    show = actions.add_parser("show", help="one model's config, copies and pairing (JSON)")
    show.add_argument("--deploy", required=True, type=Path)
    show.add_argument("name")
    show.set_defaults(run=_show)
    policy = actions.add_parser("set-policy", help="change the output policy in both copies")
    policy.add_argument("--deploy", required=True, type=Path)
    policy.add_argument("name")
    policy.add_argument("--policy", required=True, choices=["topk", "label", "rounding"])
    policy.add_argument("--k", type=int, default=3, help="top-k cap (topk policy)")
    policy.add_argument("--decimals", type=int, help="rounding of scores or embeddings")
    policy.set_defaults(run=_set_policy)
    delete = actions.add_parser("delete", help="remove a model from both tiers' folders")
    delete.add_argument("--deploy", required=True, type=Path)
    delete.add_argument("name")
    delete.set_defaults(run=_delete)


def _list(args: argparse.Namespace) -> int:
    from splitvault.model_admin import list_models

    entries = list_models(DeployLayout(args.deploy))
    if not entries:
        print("no models")
        return 0
    print(f"{'NAME':<20} {'TASK':<14} {'POLICY':<10} {'PUBLIC':<6} {'PRIVATE':<7} STATUS")
    for entry in entries:
        config = entry.config
        print(
            f"{entry.name:<20} {config.task if config else '?':<14} "
            f"{_policy(entry.config):<10} {_has(entry.public):<6} {_has(entry.private):<7} "
            f"{'ok' if not entry.problems else 'PROBLEM'}"
        )
        for problem in entry.problems:
            print(f"    {problem}")
    return 1 if any(entry.problems for entry in entries) else 0


def _show(args: argparse.Namespace) -> int:
    from splitvault.model_admin import describe, model_entry

    try:
        entry = model_entry(DeployLayout(args.deploy), args.name)
    except KeyError:
        return _unknown(args.name)
    print(json.dumps(describe(entry), indent=2))
    return 1 if entry.problems else 0


def _set_policy(args: argparse.Namespace) -> int:
    from splitvault.commands import build_policy
    from splitvault.model_admin import set_policy

    task = "embedding" if args.policy == "rounding" else "classification"
    policy = build_policy(args.policy, task, args.k, args.decimals)
    try:
        config = set_policy(DeployLayout(args.deploy), args.name, policy)
    except KeyError:
        return _unknown(args.name)
    print(f"model {config.name!r}: policy {_policy(config)} in both tiers' copies; {RESTART}")
    return 0


def _delete(args: argparse.Namespace) -> int:
    from splitvault.model_admin import delete_model

    try:
        kept = delete_model(DeployLayout(args.deploy), args.name)
    except KeyError:
        return _unknown(args.name)
    print(f"model {args.name!r} deleted from both tiers' folders; {RESTART}")
    if kept is not None:
        print(f"its watermark key (encrypted) is kept in {kept}, to prove ownership of copies")
    return 0


def _unknown(name: str) -> int:
    print(f"splitvault: error: no model {name!r} in either tier", file=sys.stderr)
    return 1


def _has(copy: ModelCopy | None) -> str:
    return "yes" if copy is not None else "no"


def _policy(config: ModelConfig | None) -> str:
    from shared.manifest import TopKPolicy

    if config is None:
        return "?"
    policy = config.policy
    return f"top-{policy.k}" if isinstance(policy, TopKPolicy) else policy.kind
