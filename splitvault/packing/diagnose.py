"""Checks that name the fix: names refused before tracing (model, split, submodules torch
cannot rebuild), and what ``torch.export`` raises turned into a ``TraceError``."""

from __future__ import annotations

import difflib
import io
import logging
import re
import sys
import traceback
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, redirect_stderr
from pathlib import Path
from typing import TypeVar

import torch
from torch import fx

from shared.manifest import MODEL_NAME_PATTERN
from splitvault.errors import PackError, SplitError, TraceError, first_line

_SPECIALISED = re.compile(r"Constraints violated \(([^)]*)\)")
_CONSTANT = re.compile(r"specialized it to be a constant \((\d+)\)")
T = TypeVar("T")
_LIBRARIES = ("/torch/", "/splitvault/", "/site-packages/", "<frozen")


@contextmanager
def quiet_torch() -> Iterator[None]:
    """Hold back torch's warnings and log records (graph dumps, guard notes) while tracing;
    what matters reaches the operator as a ``TraceError``, the rest with ``--verbose``."""
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(logging.NOTSET)


def traced(export: Callable[[], T]) -> T:
    """Run ``export`` (a ``torch.export.export`` call); a failure becomes a ``TraceError``.

    torch prints a partial graph to stderr before it raises: that is kept as the error's
    ``detail`` (shown with ``--verbose``) instead of filling the terminal.
    """
    held = io.StringIO()
    try:
        with redirect_stderr(held):
            result = export()
    except Exception as error:
        explained = explain_export_error(error)
        explained.detail = held.getvalue()
        raise explained from error
    sys.stderr.write(held.getvalue())
    return result


def reserved_names() -> frozenset[str]:
    """Attribute names of the graph module ``ep.module()`` builds; a top-level submodule of the
    same name (``meta``, ``graph``, ``code``) breaks it in torch."""
    graph_module = fx.GraphModule(torch.nn.Module(), fx.Graph())
    return frozenset(dir(graph_module)) | {"_guards_fn"}


def check_top_level_names(names: Iterable[str]) -> None:
    """Refuse a top-level submodule that ``ep.module()`` would confuse with its own attribute."""
    clashes = sorted(set(names) & reserved_names())
    if clashes:
        name = clashes[0]
        raise TraceError(
            f"the model has a top-level submodule named {name!r}, which torch.export cannot rebuild",
            cause=f"torch's graph module has an attribute {name!r} of its own (a torch bug)",
            fix=f"rename that submodule (e.g. self.{name}_net) and its state_dict keys to match",
        )


def check_model_name(name: str) -> None:
    """Refuse a name the tiers would refuse (it names a folder and a URL path)."""
    if re.fullmatch(MODEL_NAME_PATTERN, name):
        return
    slug = re.sub(r"[^a-z0-9_.-]+", "-", name.lower()).strip("-._")[:64] or "my-model"
    raise PackError(
        f"invalid model name {name!r}",
        cause="a name is 1-64 of a-z 0-9 _ . - starting with a letter or digit (a folder, a URL)",
        fix=f"--name {slug}",
    )


def check_split_name(split: str, modules: Iterable[str]) -> None:
    """Refuse an unknown ``--split`` with the nearest names."""
    known = [name for name in modules if name]
    if split in known:
        return
    close = difflib.get_close_matches(split, known, n=1, cutoff=0.5)
    suggestion = f"did you mean {close[0]!r}?" if close else ""
    listed = ", ".join(known[:12]) + (", ..." if len(known) > 12 else "")
    raise SplitError(
        f"the model has no submodule {split!r}" + (f"; {suggestion}" if suggestion else ""),
        cause=f"its submodules are {listed}" if known else "the model has no submodules",
        fix="`splitvault inspect` lists the split points with the share each keeps private",
    )


def explain_export_error(error: Exception) -> TraceError:
    """What to tell the operator about an error raised by ``torch.export.export``."""
    text = str(error)
    where = user_code(error)
    at = f" at {where}" if where else ""
    if "data-dependent" in text or "GuardOnDataDependent" in type(error).__name__:
        return TraceError(
            f"the model's control flow depends on tensor values{at}",
            cause="torch.export traces one path and cannot branch on a value it does not know",
            fix="write the branch with torch.cond or torch.where, or export it yourself and pass "
            "--program model.pt2",
        )
    specialised = _SPECIALISED.search(text)
    if specialised:
        dim = specialised.group(1)
        constant = _CONSTANT.search(text)
        size = f" to {constant.group(1)}" if constant else ""
        return TraceError(
            f"the model fixes the size of dimension {dim!r}{size}{at}",
            cause=f"splitvault serves any {dim} size, but the code assumes one (a reshape or a "
            "loop over a fixed size)",
            fix=_size_fix(dim),
        )
    return TraceError(
        f"torch.export cannot trace the model{at}",
        cause=first_line(error),
        fix="--verbose shows torch's message; a model that torch.export.export takes packs",
    )


def _size_fix(dim: str) -> str:
    if dim == "batch":
        return "use x.shape[0] or -1 instead of a constant batch size in forward()"
    return (
        f"use x.shape[...] or -1 instead of a constant {dim} size in forward(), or leave "
        f"{dim!r} out of the ModelSpec's dynamic_dims"
    )


def user_code(error: BaseException) -> str | None:
    """``file.py:LINE `code``` of the innermost frame of the model's own code, if any."""
    frames = traceback.extract_tb(error.__traceback__)
    for frame in reversed(frames):
        if not any(part in frame.filename for part in _LIBRARIES):
            line = (frame.line or "").strip()
            return f"{Path(frame.filename).name}:{frame.lineno}" + (f" `{line}`" if line else "")
    return None
