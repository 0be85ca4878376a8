"""The work behind ``splitvault pack`` (kept out of cli.py so the parser stays light)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import structlog
import torch

from shared.keys import LocalFileKeyProvider
from shared.layout import DeployLayout
from shared.manifest import BATCH_DIM, LabelPolicy, OutputPolicy, RoundingPolicy, TopKPolicy
from splitvault.errors import CommandError
from splitvault.packing.diagnose import check_model_name, quiet_torch
from splitvault.packing.factory import load_factory
from splitvault.packing.pack import PackOptions, PackResult, pack_program, pack_spec
from splitvault.packing.shares import PRIVATE_SHARE_FLOOR, PRIVATE_SHARE_WARNING, private_share
from splitvault.packing.spec import ModelSpec


def build_policy(kind: str | None, task: str, k: int, decimals: int | None) -> OutputPolicy:
    """The output policy from CLI flags; defaults: top-k for classifiers, rounding for embeddings."""
    kind = kind or ("topk" if task == "classification" else "rounding")
    if kind == "topk":
        return TopKPolicy(k=k, decimals=4 if decimals is None else decimals)
    if kind == "label":
        return LabelPolicy()
    return RoundingPolicy(decimals=3 if decimals is None else decimals)


def pack_command(args: argparse.Namespace) -> int:
    """Run ``splitvault pack`` and print the parameters each tier holds."""
    with torch_output(args), pack_logs(args):
        return _pack(args)


@contextmanager
def pack_logs(args: argparse.Namespace) -> Iterator[None]:
    """While ``pack`` runs, structured logs go to stderr, and below a warning only with
    ``--verbose``: stdout is the command's own report. The previous configuration is restored."""
    previous = structlog.get_config()
    level = "debug" if getattr(args, "verbose", False) else "warning"
    structlog.configure(
        logger_factory=structlog.WriteLoggerFactory(sys.stderr),
        wrapper_class=structlog.make_filtering_bound_logger(level),
        cache_logger_on_first_use=False,
    )
    try:
        yield
    finally:
        structlog.configure(**previous)


def torch_output(args: argparse.Namespace) -> AbstractContextManager[None]:
    """torch's own warnings and logs only with ``--verbose``."""
    return nullcontext() if getattr(args, "verbose", False) else quiet_torch()


def _pack(args: argparse.Namespace) -> int:
    check_model_name(args.name)
    layout = require_deployment(args.deploy)
    provider = LocalFileKeyProvider.load(layout.kek)
    labels = read_labels(args.labels) if args.labels else None
    floor = None if args.force else PRIVATE_SHARE_FLOOR
    if args.factory:
        spec = load_factory(args.factory)
        task = args.task or spec.task
        tokenizer = args.tokenizer or spec.tokenizer
        spec = dataclasses.replace(
            spec, task=task, labels=labels or spec.labels, tokenizer=tokenizer
        )
        warn_about_spec(spec)
        result = pack_spec(
            spec,
            name=args.name,
            split=args.split,
            layout=layout,
            provider=provider,
            policy=build_policy(args.policy, task, args.k, args.decimals),
            transport_datatype=args.transport,
            max_batch_size=args.max_batch,
            show_progress=not args.quiet,
            min_private_share=floor,
        )
    else:
        task = args.task or "classification"
        options = PackOptions(
            args.name,
            args.split,
            task,
            build_policy(args.policy, task, args.k, args.decimals),
            args.transport,
            args.max_batch,
            labels,
            min_private_share=floor,
            tokenizer=args.tokenizer,
        )
        program = load_program(args.program)
        warn_about_program(program)
        result = pack_program(
            program, options, layout=layout, provider=provider, show_progress=not args.quiet
        )
    print_result(result)
    warn_about_share(result)
    if args.assess_data:
        from splitvault.assess.cli import pack_assessment_line

        print(pack_assessment_line(args))
    return 0


def require_deployment(root: Path) -> DeployLayout:
    """The layout of ``root``, refused unless ``splitvault init`` made it."""
    layout = DeployLayout(root)
    if not layout.kek.is_file() or not layout.public.root.is_dir():
        what = "does not exist" if not root.exists() else "is not a deployment folder"
        raise CommandError(
            f"--deploy {str(root)!r} {what}",
            cause=f"no {layout.kek} (written by `splitvault init`)",
            fix=f"run `splitvault init {root}` first, or pass the folder init created",
        )
    return layout


def read_labels(path: Path) -> list[str]:
    """Class labels, one per line in class-index order (blank lines at the end ignored)."""
    try:
        lines = path.read_text("utf-8").splitlines()
    except OSError as error:
        raise CommandError(
            f"cannot read --labels {str(path)!r}",
            cause=error.strerror or type(error).__name__,
            fix="give a text file with one class label per line",
        ) from None
    while lines and not lines[-1].strip():
        lines.pop()
    labels = [line.strip() for line in lines]
    if "" in labels or not labels:
        where = f"line {labels.index('') + 1} is blank" if labels else "it is empty"
        raise CommandError(
            f"--labels {str(path)!r}: {where}",
            cause="each line is the label of one class, in class-index order",
            fix="write one non-empty label per line",
        )
    return labels


def load_program(path: Path) -> Any:
    """``torch.export.load``, refused with a fix when the file is not an exported program."""
    try:
        return torch.export.load(path)
    except FileNotFoundError:
        raise CommandError(
            f"--program {str(path)!r} does not exist",
            cause="no such file",
            fix="save one with torch.export.save(torch.export.export(model, ...), 'model.pt2')",
        ) from None
    except Exception as error:
        raise CommandError(
            f"--program {str(path)!r} is not a saved torch.export program",
            cause=f"{type(error).__name__} while loading it",
            fix="save one with torch.export.save(torch.export.export(model, ...), 'model.pt2')",
        ) from error


def warn(message: str) -> None:
    """One warning line on stderr."""
    print(f"splitvault: warning: {message}", file=sys.stderr)


def warn_about_spec(spec: ModelSpec) -> None:
    """Fixed batches and a model left in training mode."""
    if spec.module.training:
        warn("the factory returned the model in training mode; it is packed in eval mode")
    for name, example in spec.example_inputs.items():
        if 0 not in spec.dims_for(name) and example.dim() > 0:
            warn(_fixed_batch(name, int(example.shape[0])))


def warn_about_program(program: Any) -> None:
    """Inputs whose batch dimension the export fixed."""
    users = set(program.graph_signature.user_inputs)
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in users:
            shape = node.meta["val"].shape
            if len(shape) and not isinstance(shape[0], torch.SymInt):
                warn(_fixed_batch(node.name, int(shape[0])))


def _fixed_batch(name: str, size: int) -> str:
    return (
        f"input {name!r} has a fixed {BATCH_DIM} of {size}: only requests of exactly {size} rows "
        f"will be answered; export with dynamic_shapes={{{name!r}: {{0: Dim('batch')}}}}"
    )


def warn_about_share(result: PackResult) -> None:
    """Say so when most parameters sit on the internet-facing host."""
    share = private_share(result.public.parameters, result.private.parameters)
    if share < PRIVATE_SHARE_WARNING:
        warn(
            f"only {share:.1%} of the parameters are private (below {PRIVATE_SHARE_WARNING:.0%}); "
            "`splitvault inspect` lists earlier split points"
        )


def print_result(result: PackResult) -> None:
    """How many parameters each tier holds, and where the stages went."""
    total = result.public.parameters + result.private.parameters
    share = 100.0 * result.private.parameters / total if total else 0.0
    print(f"packed {result.config.name!r} split after {result.config.split!r}:")
    print(f"  public tier:  {result.public.parameters:>12,} parameters  -> {result.front_path}")
    print(
        f"  private tier: {result.private.parameters:>12,} parameters  -> {result.back_path} "
        f"(encrypted, {share:.1f}% of the model)"
    )
    print(
        f"pairing id {result.pairing_id}: restart both tiers (a tier still serving an earlier "
        f"pack of {result.config.name!r} reports the model not ready until it restarts)"
    )
