"""Operator-facing errors of splitvault's commands, printed as three lines: what, cause, fix.

    CommandError               a failure the operator can fix (init, pack, inspect, serve)
    ├── PackError (ValueError)        the model cannot be packed as asked (labels, share floor)
    └── SplitError (ValueError)       the model cannot be cut at the split point asked for
        └── TraceError                torch.export refused the model (packing.diagnose)

They are never served, so they are not in ``shared.errors.ERROR_TABLE`` (that table is for
errors that cross HTTP and gRPC). ``report`` prints any exception; the traceback of what
caused it only with ``--verbose``.
"""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import TextIO

from pydantic import ValidationError

from shared.layout import DeployLayout

PREFIX = "splitvault: error:"


class CommandError(Exception):
    """A failure the operator can fix: what went wrong, why, and what to do."""

    def __init__(self, what: str, *, cause: str, fix: str) -> None:
        super().__init__(what)
        self.what = what
        self.cause = cause
        self.fix = fix
        self.detail = ""  # what a library printed on its way to failing: shown with --verbose

    def lines(self) -> list[str]:
        """The three lines ``report`` prints."""
        return [f"{PREFIX} {self.what}", f"  cause: {self.cause}", f"  fix: {self.fix}"]


class PackError(CommandError, ValueError):
    """The model cannot be packed as asked (labels that do not fit, too little kept private)."""


class SplitError(CommandError, ValueError):
    """The model cannot be cut at the requested point."""

    def __init__(
        self,
        what: str,
        *,
        cause: str = "the split point must be a submodule on the way to the output",
        fix: str = "`splitvault inspect` lists the split points of a model",
    ) -> None:
        super().__init__(what, cause=cause, fix=fix)


class TraceError(SplitError):
    """``torch.export`` could not trace the model (control flow, fixed sizes, names)."""


def first_line(error: BaseException) -> str:
    """The first non-empty line of an exception's message, prefixed by its type."""
    text = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
    name = type(error).__name__
    return f"{name}: {text}" if text else name


def validation_summary(error: ValidationError) -> str:
    """A pydantic error on one line: ``field: message; field: message`` (no input dump, no URL)."""
    parts = []
    for item in error.errors(include_url=False, include_input=False):
        where = ".".join(str(part) for part in item["loc"]) or error.title
        parts.append(f"{where}: {item['msg']}")
    return "; ".join(parts)


def summary_lines(error: Exception) -> list[str]:
    """What to print for ``error``: a ``CommandError``'s three lines, one line for a bad value
    or path (the message says it), three for anything unexpected."""
    if isinstance(error, CommandError):
        return error.lines()
    if isinstance(error, ValidationError):
        return [f"{PREFIX} {validation_summary(error)}"]
    if isinstance(error, FileNotFoundError | FileExistsError | ValueError):
        return [f"{PREFIX} {error}"]
    unexpected = CommandError(
        "unexpected failure", cause=first_line(error), fix="rerun with --verbose for the traceback"
    )
    return unexpected.lines()


def exit_status(error: Exception) -> int:
    """2 for a failure the operator can fix (bad flag, path or value), 1 for anything else."""
    fixable = CommandError | ValidationError | FileNotFoundError | FileExistsError | ValueError
    return 2 if isinstance(error, fixable) else 1


def require_tier(root: Path, tier: str) -> DeployLayout:
    """The layout of ``root``, refused unless it holds ``tier``'s folder."""
    layout = DeployLayout(root)
    folder = layout.public.root if tier == "public" else layout.private.root
    if not folder.is_dir():
        raise CommandError(
            f"--deploy {str(root)!r} has no {tier} tier folder",
            cause=f"no {folder} (made by `splitvault init`, copied to the {tier} host)",
            fix=f"run `splitvault init {root}` first, or pass the folder holding {tier}/",
        )
    return layout


# What a required tier setting missing from the flags, TOML file and environment means.
_MISSING_HINTS = {
    "private_addresses": (
        "the public tier needs the private tier's address",
        "--private HOST:PORT (repeat for replicas), or private_addresses in public.toml",
    ),
}


def settings_error(error: ValidationError, tier: str) -> CommandError:
    """A tier's settings error as three lines; a missing required setting says how to give it."""
    for item in error.errors(include_url=False, include_input=False):
        field = str(item["loc"][0]) if item["loc"] else ""
        if item["type"] == "missing" and field in _MISSING_HINTS:
            what, fix = _MISSING_HINTS[field]
            return CommandError(what, cause=f"{field} is not set", fix=fix)
    return CommandError(
        f"invalid {tier} tier settings",
        cause=validation_summary(error),
        fix=f"correct them in {tier}.toml, the environment or the flags",
    )


def report(error: Exception, out: TextIO, *, verbose: bool) -> None:
    """Print ``error``'s summary; with ``verbose``, its traceback (and its cause's) first."""
    if verbose:
        if isinstance(error, CommandError) and error.detail:
            print(error.detail.rstrip("\n"), file=out)
        traceback.print_exception(error, file=out)
    for line in summary_lines(error):
        print(line, file=out)
