"""The work behind ``splitvault pack`` (kept out of cli.py so the parser stays light)."""

from __future__ import annotations

import argparse
from typing import Any

import torch

from shared.keys import LocalFileKeyProvider
from shared.layout import DeployLayout
from shared.manifest import LabelPolicy, OutputPolicy, RoundingPolicy, TopKPolicy
from splitvault.packing.pack import PackOptions, PackResult, pack_program, pack_spec
from splitvault.packing.spec import load_factory


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
    layout = DeployLayout(args.deploy)
    provider = LocalFileKeyProvider.load(layout.kek)
    if args.factory:
        spec = load_factory(args.factory)
        task = args.task or spec.task
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
        )
    else:
        task = args.task or "classification"
        labels = args.labels.read_text("utf-8").split() if args.labels else None
        options = PackOptions(
            args.name,
            args.split,
            task,
            build_policy(args.policy, task, args.k, args.decimals),
            args.transport,
            args.max_batch,
            labels,
        )
        program: Any = torch.export.load(args.program)
        result = pack_program(
            program, options, layout=layout, provider=provider, show_progress=not args.quiet
        )
    print_result(result)
    return 0


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
