"""``splitvault assess``: parser and command (torch is imported only when it runs)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from splitvault.assess.experiment import Settings


def add_assess_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``assess`` to the ``splitvault`` parser."""
    assess = commands.add_parser(
        "assess", help="measure what a split protects: front-known thief against black-box thief"
    )
    assess.add_argument("--model", default="model", help="the deployed model's name")
    assess.add_argument("--deploy", type=Path, help="the deployment folder (decrypts the back)")
    assess.add_argument("--kek-file", type=Path, help="KEK (default DEPLOY/secrets/kek)")
    assess.add_argument(
        "--data", required=True, help="natural inputs: .npz by input name, .npy, .txt, or 'demo'"
    )
    assess.add_argument("--tokenizer", type=Path, help="tokenizer folder for a .txt file")
    assess.add_argument(
        "--candidates", help="split points a,b,c to compare (needs --factory or --program)"
    )
    source = assess.add_mutually_exclusive_group()
    source.add_argument("--factory", help="pkg.module:function of the model (for --candidates)")
    source.add_argument("--program", type=Path, help="a saved torch.export program (.pt2)")
    assess.add_argument("--task", choices=["classification", "embedding"])
    assess.add_argument(
        "--public-init", help="factory of public pretrained weights the thieves start from"
    )
    add_budget_arguments(assess)
    assess.add_argument("--quiet", action="store_true", help="no progress bar")
    assess.set_defaults(run=_assess)


def add_budget_arguments(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    """Budgets, seeds, margin and training steps (``pack`` adds them as ``--assess-*``)."""
    parser.add_argument(
        f"--{prefix}budgets",
        dest="budgets",
        default="50,200,1000",
        help="query budgets, comma-separated (50,200,1000)",
    )
    parser.add_argument(f"--{prefix}seeds", dest="seeds", type=int, default=5, help="(5)")
    parser.add_argument(
        f"--{prefix}margin",
        dest="margin",
        type=float,
        default=5.0,
        help="allowed gain of the front-known thief, in fidelity points (5)",
    )
    parser.add_argument(
        f"--{prefix}steps", dest="steps", type=int, default=300, help="Adam steps per thief (300)"
    )
    parser.add_argument(
        f"--{prefix}batch-size", dest="batch_size", type=int, default=32, help="(32)"
    )
    parser.add_argument(
        f"--{prefix}max-inputs",
        dest="max_inputs",
        type=int,
        help="use a seeded random subset of this many inputs (default: all)",
    )
    parser.add_argument(
        f"--{prefix}heldout",
        dest="heldout",
        type=int,
        default=1000,
        help="held-out inputs for fidelity, at most (1000; and at most a quarter of the data)",
    )


def settings_from(args: argparse.Namespace) -> Settings:
    """The experiment settings from parsed arguments."""
    from splitvault.assess.experiment import Settings
    from splitvault.assess.thieves import Training

    try:
        budgets = [int(b) for b in args.budgets.split(",") if b.strip()]
    except ValueError:
        raise ValueError(f"budgets {args.budgets!r}: give whole numbers, comma-separated") from None
    return Settings(
        budgets=budgets,
        seeds=args.seeds,
        margin=args.margin / 100.0,
        max_heldout=args.heldout,
        max_inputs=args.max_inputs,
        training=Training(steps=args.steps, batch_size=args.batch_size),
    )


def pack_assessment_line(args: argparse.Namespace) -> str:
    """The one assess line ``pack --assess-data`` prints for the model it just packed."""
    from splitvault.assess.report import one_line
    from splitvault.assess.run import Request, run_assessment

    request = Request(
        data=args.assess_data,
        model=args.name,
        deploy=args.deploy,
        settings=settings_from(args),
        show_progress=not args.quiet,
    )
    return one_line(run_assessment(request).assessments[0])


def _assess(args: argparse.Namespace) -> int:
    from splitvault.assess.run import Request, run_assessment

    settings = settings_from(args)
    candidates = [c.strip() for c in (args.candidates or "").split(",") if c.strip()]
    if candidates and not (args.factory or args.program):
        raise ValueError("--candidates re-splits the original model: give --factory or --program")
    outcome = run_assessment(
        Request(
            data=args.data,
            model=args.model,
            deploy=args.deploy,
            kek_file=args.kek_file,
            factory=args.factory,
            program=args.program,
            task=args.task,
            candidates=candidates,
            public_init=args.public_init,
            tokenizer=args.tokenizer,
            settings=settings,
            show_progress=not args.quiet,
        )
    )
    print("\n".join(outcome.lines))
    return 0
