"""``splitvault``: the one command-line entry point (init, pack, inspect, serve, health, demo)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from public_api.monitor.cli import add_monitor_commands
from shared.layout import DeployLayout
from shared.logs import configure_logging
from shared.openmp import default_wait_policy, log_wait_policy
from splitvault.admin import add_admin_commands
from splitvault.assess.cli import add_assess_command, add_budget_arguments
from splitvault.errors import exit_status, report, require_tier, settings_error
from splitvault.ledger_cli import add_ledger_commands
from splitvault.models_cli import add_models_commands
from splitvault.ownership.cli import add_ownership_commands
from splitvault.rotation import add_rotation_commands
from splitvault.state_cli import add_state_commands


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments and run one command; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args))
    except KeyboardInterrupt:
        return 130
    except Exception as error:
        report(error, sys.stderr, verbose=getattr(args, "verbose", False))
        return exit_status(error)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="splitvault", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    init = commands.add_parser("init", help="create a deployment folder (CA, certificates, KEK)")
    init.add_argument("deploy", type=Path)
    init.add_argument("--public-host", action="append", default=[], help="public DNS name or IP")
    init.add_argument("--private-host", action="append", default=[], help="private DNS name or IP")
    init.add_argument(
        "--public-replicas",
        type=int,
        default=1,
        help="public replicas, each with its own client identity (splitvault-public-N)",
    )
    init.set_defaults(run=_init)
    _add_pack(commands)
    _add_inspect(commands)
    _add_serve(commands)
    _add_health(commands)
    add_admin_commands(commands)
    add_rotation_commands(commands)
    add_monitor_commands(commands)
    add_ownership_commands(commands)
    add_ledger_commands(commands)
    add_state_commands(commands)  # state migrate (issue 15)
    add_assess_command(commands)
    # model management and local development
    add_models_commands(commands)
    up = commands.add_parser("up", help="run both tiers on loopback for local development")
    up.add_argument("--deploy", required=True, type=Path)
    up.add_argument("--port", type=int, default=8443, help="the public tier's HTTPS port")
    up.set_defaults(run=_up)
    demo = commands.add_parser("demo", help="pack and serve the two demo models, compare answers")
    demo.add_argument("--workdir", type=Path, help="keep the deployment here (default: temp)")
    demo.add_argument("--skip-minilm", action="store_true", help="only the digits model")
    demo.set_defaults(run=_demo)
    _add_verbose(parser)
    return parser


def _add_verbose(parser: argparse.ArgumentParser, top: bool = True) -> None:
    """``--verbose`` on every command (unless it has one): a failure prints its traceback too."""
    default: object = False if top else argparse.SUPPRESS
    if "--verbose" not in parser._option_string_actions:
        parser.add_argument(
            "--verbose", action="store_true", default=default, help="print tracebacks on failure"
        )
    for action in parser._subparsers._group_actions if parser._subparsers else []:
        for sub in getattr(action, "choices", {}).values():
            _add_verbose(sub, top=False)


def _add_inspect(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    inspect = commands.add_parser(
        "inspect", help="list a model's split points with the share each keeps private"
    )
    source = inspect.add_mutually_exclusive_group(required=True)
    source.add_argument("--factory", help="module:function or path/to/file.py:function")
    source.add_argument("--program", type=Path, help="a saved torch.export program (.pt2)")
    inspect.add_argument(
        "--all", action="store_true", help="also cuts inside blocks with a skip path"
    )
    inspect.set_defaults(run=_inspect)


def _add_pack(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    pack = commands.add_parser("pack", help="split a model; front to public/, back encrypted")
    pack.add_argument("--name", required=True)
    pack.add_argument("--split", required=True, help="submodule whose output ends the front")
    pack.add_argument("--deploy", required=True, type=Path)
    source = pack.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--factory",
        help="module:function (from this folder) or path/to/file.py:function returning a "
        "ModelSpec or (module, example input)",
    )
    source.add_argument("--program", type=Path, help="a saved torch.export program (.pt2)")
    pack.add_argument(
        "--force", action="store_true", help="pack even when under 10%% of parameters are private"
    )
    pack.add_argument("--task", choices=["classification", "embedding"])
    pack.add_argument("--policy", choices=["topk", "label", "rounding"])
    pack.add_argument("--k", type=int, default=3, help="top-k cap (topk policy)")
    pack.add_argument("--decimals", type=int, help="rounding of scores or embeddings")
    pack.add_argument("--labels", type=Path, help="file with one class label per line")
    pack.add_argument("--transport", choices=["FP16", "FP32"], default="FP16")
    pack.add_argument("--max-batch", type=int, default=64)
    pack.add_argument("--quiet", action="store_true", help="no progress bars")
    pack.add_argument(  # text in (issue 16): the public tier then takes text
        "--tokenizer", type=Path, help="a text model's tokenizer.json, copied to public/"
    )
    pack.add_argument(
        "--assess-data", help="natural inputs (see `assess --data`): print one assess line"
    )
    add_budget_arguments(pack, prefix="assess-")
    pack.set_defaults(run=_pack)


def _add_serve(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = commands.add_parser("serve", help="run a tier")
    tiers = serve.add_subparsers(dest="tier", required=True)
    private = tiers.add_parser("private", help="gRPC over mutual TLS, back stages")
    private.add_argument("--deploy", required=True, type=Path)
    private.add_argument("--host")
    private.add_argument("--port", type=int)
    private.add_argument("--kek-file", type=Path)
    private.set_defaults(run=_serve_private)
    public = tiers.add_parser("public", help="HTTPS v2 REST, front stages")
    public.add_argument("--deploy", required=True, type=Path)
    public.add_argument(
        "--private",
        action="append",
        dest="private_addresses",
        help="private tier HOST:PORT (repeat for replicas)",
    )
    public.add_argument("--host")
    public.add_argument("--port", type=int)
    public.add_argument(
        "--insecure-http",
        action="store_true",
        default=None,
        help="plain HTTP, only behind a TLS-terminating proxy",
    )
    public.set_defaults(run=_serve_public)


def _add_health(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    health = commands.add_parser(
        "health", help="probe a tier: print ready or why not (exit 0 only when ready)"
    )
    tiers = health.add_subparsers(dest="tier", required=True)
    private = tiers.add_parser("private")
    private.add_argument("--deploy", required=True, type=Path)
    private.add_argument("--address", default="127.0.0.1:50051")
    private.add_argument(
        "--live",
        action="store_true",
        help="exit 0 when the tier answers at all, ready or not (a liveness probe)",
    )
    private.set_defaults(run=_health_private)
    public = tiers.add_parser("public")
    public.add_argument("--deploy", required=True, type=Path)
    public.add_argument("--url", default="https://localhost:8443")
    public.add_argument(
        "--metrics-url",
        default="http://127.0.0.1:9465/metrics",
        help="the tier's internal metrics listener, for the settings that switch protections off",
    )
    public.set_defaults(run=_health_public)


def _init(args: argparse.Namespace) -> int:
    from splitvault.deploy import init_deployment

    layout = init_deployment(
        args.deploy,
        public_hosts=args.public_host,
        private_hosts=args.private_host,
        public_replicas=args.public_replicas,
    )
    print(f"deployment created in {layout.root}")
    print(f"  CA (keep offline):        {layout.ca}")
    print(f"  KEK (private tier secret): {layout.kek}")
    print(f"  public tier folder:        {layout.public.root}")
    print(f"  private tier folder:       {layout.private.root}")
    if args.public_replicas > 1:
        print(f"  public replicas 2..{args.public_replicas}:    {layout.public_replicas}")
    return 0


def _pack(args: argparse.Namespace) -> int:
    from splitvault.commands import pack_command

    return pack_command(args)


def _inspect(args: argparse.Namespace) -> int:
    from splitvault.inspection import inspect_command

    return inspect_command(args)


def _serve_private(args: argparse.Namespace) -> int:
    omp = default_wait_policy()  # before torch loads (shared/openmp.py)
    from private_core.admission_store import AdmissionStateError
    from private_core.private_redis import PrivateStoreRefused
    from private_core.server import serve
    from private_core.settings import PrivateSettings
    from private_core.state import StateLocked, StateUnwritable
    from shared.settings import given

    layout = require_tier(args.deploy, "private")
    kek_file = args.kek_file or (layout.kek if layout.kek.exists() else None)
    settings = PrivateSettings.load(
        layout.private_config,
        secrets_dir=Path("/run/secrets"),
        tier_dir=layout.private.root,
        host=given(args.host),
        port=given(args.port),
        kek_file=given(kek_file),
    )
    configure_logging(settings.log_level, tier="private")
    log_wait_policy(*omp)
    try:
        asyncio.run(serve(settings))
    except (StateUnwritable, AdmissionStateError, PrivateStoreRefused):
        return 1  # logged: private_state_unwritable, admission_state_unreadable, ..._refused
    except StateLocked as error:  # logged too (private_state_locked); said plainly as well
        print(f"splitvault: {error}", file=sys.stderr)
        return 1
    return 0


def _serve_public(args: argparse.Namespace) -> int:
    omp = default_wait_policy()  # before torch loads (shared/openmp.py)
    from public_api.server import serve
    from public_api.settings import PublicSettings
    from shared.settings import given

    layout = require_tier(args.deploy, "public")
    try:
        settings = PublicSettings.load(
            layout.public_config,
            secrets_dir=Path("/run/secrets"),
            tier_dir=layout.public.root,
            host=given(args.host),
            port=given(args.port),
            private_addresses=given(args.private_addresses),
            insecure_http=given(args.insecure_http),
        )
    except ValidationError as error:
        raise settings_error(error, "public") from error
    configure_logging(settings.log_level, tier="public")
    log_wait_policy(*omp)
    serve(settings)
    return 0


def _health_private(args: argparse.Namespace) -> int:
    from splitvault.probes import probe_private

    probe = probe_private(DeployLayout(args.deploy), args.address)
    _print_probe(probe.ready, probe.reasons)
    return 0 if probe.ready or (args.live and probe.answered) else 1


def _print_probe(ready: bool, reasons: list[str]) -> None:
    print("ready" if ready else f"not ready: {reasons[0] if reasons else 'no reason given'}")
    for reason in reasons[1:]:
        print(f"  {reason}")


def _health_public(args: argparse.Namespace) -> int:
    from splitvault.probes import check_public

    health = check_public(DeployLayout(args.deploy), args.url, args.metrics_url)
    _print_probe(health.probe.ready, health.probe.reasons)
    if health.unsafe is None:
        print(f"unsafe settings: unknown (no answer from {args.metrics_url})")
    elif health.unsafe:
        from public_api.unsafe import EFFECTS

        for setting, value in health.unsafe:
            effect = EFFECTS.get(setting, "switches a protection off")
            print(f"WARNING: unsafe setting {setting} = {value}: {effect}")
    return 0 if health.ready else 1


def _up(args: argparse.Namespace) -> int:
    from splitvault.up import run_up

    return run_up(args.deploy, args.port)


def _demo(args: argparse.Namespace) -> int:
    from splitvault.demo.run import run_demo

    return int(run_demo(args.workdir, include_minilm=not args.skip_minilm))


if __name__ == "__main__":
    raise SystemExit(main())
