"""``splitvault inspect``: the split points of a model and what each keeps private."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from splitvault.commands import load_program, torch_output, warn_about_program, warn_about_spec
from splitvault.packing.factory import load_factory
from splitvault.packing.shares import (
    PRIVATE_SHARE_FLOOR,
    PRIVATE_SHARE_WARNING,
    Candidate,
    split_candidates,
)
from splitvault.packing.split import export_model

HEADER = ("split", "crosses", "public params", "private params", "private FLOPs", "")


def inspect_command(args: argparse.Namespace) -> int:
    """Print every split candidate (on the main path unless ``--all``) with its shares."""
    with torch_output(args):
        return _inspect(args)


def _inspect(args: argparse.Namespace) -> int:
    if args.factory:
        spec = load_factory(args.factory)
        warn_about_spec(spec)
        candidates = split_candidates(export_model(spec), spec.dynamic_dims)
        source = args.factory
    else:
        program = load_program(args.program)
        warn_about_program(program)
        candidates = split_candidates(program)
        source = str(args.program)
    shown = [c for c in candidates if args.all or c.main_path]
    skipped = len(candidates) - len(shown)
    print(f"split points of {source} (`pack --split NAME`), in execution order:")
    for line in format_table(shown):
        print(line)
    if skipped:
        print(f"({skipped} more where several tensors cross, a skip path or a branch: --all)")
    print(
        f"pack warns below {PRIVATE_SHARE_WARNING:.0%} of the parameters private and refuses "
        f"below {PRIVATE_SHARE_FLOOR:.0%} unless --force"
    )
    return 0


def verdict(candidate: Candidate) -> str:
    """What ``pack`` would say about this split's private parameter share."""
    share = candidate.shares.private_parameter_share
    if share < PRIVATE_SHARE_FLOOR:
        return "refused (needs --force)"
    if share < PRIVATE_SHARE_WARNING:
        return "warning"
    return ""


def format_table(candidates: Sequence[Candidate]) -> list[str]:
    """One aligned row per candidate under a header."""
    rows = [HEADER]
    for c in candidates:
        s = c.shares
        name = c.split + (
            f" (= {', '.join(c.aliases[:2])}{', ...' if len(c.aliases) > 2 else ''})"
            if c.aliases
            else ""
        )
        rows.append(
            (
                name,
                " + ".join(c.crossing),
                f"{s.public_parameters:,} ({1 - s.private_parameter_share:.1%})",
                f"{s.private_parameters:,} ({s.private_parameter_share:.1%})",
                f"{s.private_flop_share:.1%}",
                verdict(c),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER))]
    return [
        "  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
