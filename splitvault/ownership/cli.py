"""Commands: ``verify-ownership``, ``evidence`` and ``watermark show|enable|disable|triggers``.

Heavy imports (torch, the stores) happen when a command runs, so the CLI stays quick to start.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from splitvault.ownership.sealed_cli import add_sealing_commands

if TYPE_CHECKING:
    from splitvault.ownership.owner import OwnerModel
    from splitvault.ownership.sealed import SealedQueries
    from splitvault.ownership.verify import Verification


def add_ownership_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``verify-ownership``, ``evidence`` and ``watermark`` to the ``splitvault`` parser."""
    verify = commands.add_parser(
        "verify-ownership", help="test whether a suspect model was trained on our answers"
    )
    _model_args(verify)
    verify.add_argument("--key", help="API key id or name: its sealed queries are candidates")
    _suspect_args(verify, required=True)
    verify.add_argument("--json", type=Path, help="also write the result as JSON here")
    verify.set_defaults(run=_verify)
    evidence = commands.add_parser("evidence", help="an API key's evidence report (HTML + JSON)")
    _model_args(evidence)
    evidence.add_argument("--key", required=True, help="API key id or name")
    evidence.add_argument("--out", required=True, type=Path, help="folder for the report")
    evidence.add_argument(
        "--flag-threshold", type=float, default=0.5, help="monitor score shown as flagged"
    )
    evidence.add_argument(
        "--anchors",
        type=Path,
        help="the private ledger's anchors (`splitvault ledger export-anchors`): says which "
        "records an anchor covers",
    )
    evidence.add_argument(
        "--dsn-file",
        type=Path,
        help="the replicas' shared PostgreSQL DSN file (default: the public tier's "
        "state_backend and postgres_dsn_file settings)",
    )
    _suspect_args(evidence, required=False)
    evidence.set_defaults(run=_evidence)
    _add_watermark(commands)
    add_sealing_commands(commands)


def _model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="the deployed model's name")
    parser.add_argument("--deploy", required=True, type=Path, help="the deployment folder")
    parser.add_argument("--kek-file", type=Path, help="KEK (default DEPLOY/secrets/kek)")


def _suspect_args(parser: argparse.ArgumentParser, *, required: bool) -> None:
    parser.add_argument(
        "--suspect", required=required, help="v2 REST URL, or a .pt2 / TorchScript model file"
    )
    parser.add_argument(
        "--inputs",
        type=Path,
        help="candidate inputs (.npy, or .npz by input name), fixed before querying the suspect",
    )
    parser.add_argument(
        "--owner-key",
        type=Path,
        help="the owner's private key: the key's sealed queries become candidates too",
    )
    parser.add_argument("--suspect-model", help="the model's name at the suspect's endpoint")
    parser.add_argument("--api-key", help="API key for the suspect's endpoint")
    parser.add_argument("--ca", type=Path, help="CA certificate of the suspect's endpoint")
    parser.add_argument(
        "--scheme", choices=["auto", "label", "signal", "all"], default="auto", help="tests to run"
    )
    parser.add_argument(
        "--alpha", type=float, default=2.0**-64, help="claim below this p-value (default 2^-64)"
    )
    parser.add_argument("--fraction", type=float, help="label fraction in force when answered")
    parser.add_argument(
        "--max-confidence", type=float, help="label max_confidence in force when answered"
    )


def _add_watermark(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    watermark = commands.add_parser("watermark", help="a model's watermark settings and triggers")
    actions = watermark.add_subparsers(dest="action", required=True)
    show = actions.add_parser("show", help="settings, key id and trigger log size")
    _model_args(show)
    show.set_defaults(run=_watermark_show)
    enable = actions.add_parser("enable", help="turn on (restart the private tier after)")
    _model_args(enable)
    enable.add_argument("--scheme", choices=["auto", "label", "signal"], default=None)
    enable.add_argument("--fraction", type=float, help="label: share of eligible queries (0.05)")
    enable.add_argument(
        "--max-confidence", type=float, help="label: eligible below this top-1 probability (0.9)"
    )
    enable.add_argument("--amplitude", type=float, help="signal: probability moved (0.1)")
    enable.add_argument("--max-records", type=int, help="trigger log retention, records")
    enable.add_argument("--max-bytes", type=int, help="trigger log retention, bytes")
    enable.set_defaults(run=_watermark_enable)
    disable = actions.add_parser("disable", help="turn off (restart the private tier after)")
    _model_args(disable)
    disable.set_defaults(run=_watermark_disable)
    triggers = actions.add_parser("triggers", help="trigger records as JSON lines")
    _model_args(triggers)
    triggers.add_argument("--key", help="only this API key id")
    triggers.add_argument("--with-inputs", action="store_true", help="include the activations")
    triggers.set_defaults(run=_watermark_triggers)


def _owner(args: argparse.Namespace) -> OwnerModel:
    from splitvault.ownership.owner import OwnerModel

    return OwnerModel(args.deploy, args.model, args.kek_file)


def _sealed(args: argparse.Namespace, owner: OwnerModel, key_id: str) -> SealedQueries:
    from splitvault.ownership.sealed import load_owner_key, sealed_queries

    return sealed_queries(args.deploy, key_id, owner, load_owner_key(args.owner_key))


def _sources(
    args: argparse.Namespace, owner: OwnerModel, sealed: SealedQueries | None
) -> list[tuple[str, Any]]:
    """The candidate sets, each verified on its own: the key's sealed queries, the inputs."""
    sources: list[tuple[str, Any]] = []
    if sealed is not None and sealed.rows:
        sources.append((f"sealed queries of API key {args.key}", sealed.inputs))
    if args.inputs is not None:
        sources.append((f"owner's inputs {args.inputs.name}", owner.read_inputs(args.inputs)))
    if not sources:
        raise ValueError(
            "no candidates: give --inputs, or --key with --owner-key and sealed queries"
        )
    return sources


def _run_verifications(
    args: argparse.Namespace, owner: OwnerModel, sources: list[tuple[str, Any]]
) -> list[tuple[str, Verification]]:
    """Verify the suspect on each candidate set, alpha shared among them (Bonferroni)."""
    from splitvault.ownership.suspect import RestSuspect, open_suspect
    from splitvault.ownership.verify import verify_ownership

    suspect = open_suspect(
        args.suspect,
        model=args.suspect_model or args.model,
        input_names=[spec.name for spec in owner.front_manifest.inputs],
        api_key=args.api_key,
        ca=args.ca,
        top_k=owner.classes,
    )
    try:
        return [
            (
                name,
                verify_ownership(
                    owner,
                    suspect,
                    inputs,
                    schemes=args.scheme,
                    alpha=args.alpha / len(sources),
                    fraction=args.fraction,
                    max_confidence=args.max_confidence,
                ),
            )
            for name, inputs in sources
        ]
    finally:
        if isinstance(suspect, RestSuspect):
            suspect.close()


def _key_id(args: argparse.Namespace) -> str:
    from splitvault.ownership.evidence import key_section
    from splitvault.state_access import configured_dsn

    dsn = configured_dsn(args.deploy, getattr(args, "dsn_file", None))
    return str(key_section(args.deploy, args.key, dsn)["key"]["key_id"])


def _verify(args: argparse.Namespace) -> int:
    from splitvault.ownership.evidence import verification_summary

    if (args.key is None) != (args.owner_key is None):
        raise ValueError("--key and --owner-key go together")
    owner = _owner(args)
    sealed = None if args.key is None else _sealed(args, owner, _key_id(args))
    if sealed is not None:
        print(_sealed_line(sealed))
    results = _run_verifications(args, owner, _sources(args, owner, sealed))
    for name, result in results:
        print(f"-- candidates: {name}\n{result.text()}")
    summary = verification_summary(results, args.alpha)
    if len(results) > 1:
        print(
            f"overall: {'CLAIMED' if summary['claimed'] else 'not claimed'} (alpha {args.alpha:.3g} over {len(results)} candidate sets)"
        )
    if args.json is not None:
        data = results[0][1].to_json() if len(results) == 1 else summary
        args.json.write_text(json.dumps(data, indent=2) + "\n", "utf-8")
    return 0 if summary["claimed"] else 1


def _sealed_line(sealed: SealedQueries) -> str:
    kinds = Counter(r["content_type"].split(";")[0] for r in sealed.requests)
    listed = ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items()))
    line = f"sealed queries: {len(sealed.requests)} bodies opened ({listed}), {sealed.rows} rows"
    return line + (f"; {len(sealed.problems)} did not open" if sealed.problems else "")


def _evidence(args: argparse.Namespace) -> int:
    from splitvault.ownership.evidence import build_evidence, write_evidence
    from splitvault.state_access import configured_dsn

    if args.suspect is None and args.inputs is not None:
        raise ValueError("--inputs needs --suspect")
    owner = _owner(args)
    from shared.anchors_file import AnchorsFile

    anchors = None if args.anchors is None else AnchorsFile.read(args.anchors)
    sealed = None if args.owner_key is None else _sealed(args, owner, _key_id(args))
    results = []
    if args.suspect is not None:
        results = _run_verifications(args, owner, _sources(args, owner, sealed))
    evidence = build_evidence(
        args.deploy,
        args.key,
        owner,
        results,
        args.flag_threshold,
        anchors,
        sealed=sealed,
        alpha=args.alpha,
        dsn=configured_dsn(args.deploy, args.dsn_file),
    )
    json_path, html_path = write_evidence(evidence, args.out)
    print(
        f"audit trail: {evidence['audit']['status']}; trigger log: {evidence['triggers']['status']}"
    )
    if sealed is not None:
        print(_sealed_line(sealed))
    print(_attribution_lines(evidence["triggers"]))
    if evidence["verification_text"]:
        print(evidence["verification_text"])
    print(f"wrote {html_path} and {json_path}")
    return 0


def _attribution_lines(triggers: dict[str, Any]) -> str:
    """How the watermarked answers are attributed; content mismatches said loudly."""
    counts = ", ".join(f"{n} {label}" for label, n in triggers["attribution"].items())
    line = f"watermarked answers by attribution: {counts or 'none'}"
    mismatches = triggers["content_mismatches"]
    if mismatches:
        line += (
            f"\n!!! CONTENT MISMATCH: {mismatches} signed answers were not computed from the "
            "body the customer signed: the public host substituted content (see the report)"
        )
    return line


def _private_config(args: argparse.Namespace) -> Path:
    from shared.layout import DeployLayout
    from shared.manifest import CONFIG_FILE

    path = DeployLayout(args.deploy).private.model(args.model) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no model {args.model!r} in {args.deploy}/private")
    return path


def _watermark_show(args: argparse.Namespace) -> int:
    from shared.manifest import read_config

    config = read_config(_private_config(args).parent)
    owner = _owner(args)
    count = sum(1 for _ in _triggers(owner))
    settings = config.watermark.model_dump() if config.watermark else {"enabled": False}
    print(f"model {args.model!r} watermark: {json.dumps(settings)}")
    logs = ", ".join(str(folder) for folder in owner.trigger_dirs) or str(owner.trigger_dir)
    print(f"watermark key id {owner.key.key_id}; trigger log {logs}: {count} records")
    return 0


def _watermark_enable(args: argparse.Namespace) -> int:
    changes: dict[str, Any] = {"enabled": True}
    for name, value in (
        ("scheme", args.scheme),
        ("fraction", args.fraction),
        ("max_confidence", args.max_confidence),
        ("amplitude", args.amplitude),
        ("trigger_max_records", args.max_records),
        ("trigger_max_bytes", args.max_bytes),
    ):
        if value is not None:
            changes[name] = value
    return _update_watermark(args, changes)


def _watermark_disable(args: argparse.Namespace) -> int:
    return _update_watermark(args, {"enabled": False})


def _update_watermark(args: argparse.Namespace, changes: dict[str, Any]) -> int:
    """Change the private config's watermark settings; make the key if there is none."""
    from shared.keys import LocalFileKeyProvider
    from shared.layout import DeployLayout
    from shared.manifest import ModelConfig, WatermarkConfig, read_config, write_json
    from splitvault.packing.pack import ensure_watermark_key

    path = _private_config(args)
    config = read_config(path.parent)
    current = config.watermark.model_dump() if config.watermark else {}
    watermark = WatermarkConfig.model_validate({**current, **changes})
    updated = ModelConfig.model_validate({**config.model_dump(), "watermark": watermark})
    provider = LocalFileKeyProvider.load(args.kek_file or DeployLayout(args.deploy).kek)
    key = ensure_watermark_key(path.parent, provider)
    write_json(path, updated)
    print(f"model {args.model!r} watermark: {watermark.model_dump_json()} (key id {key.key_id})")
    print("restart the private tier to apply it")
    return 0


def _triggers(owner: OwnerModel) -> Any:
    return owner.triggers()


def _watermark_triggers(args: argparse.Namespace) -> int:
    owner = _owner(args)
    for record in _triggers(owner):
        if args.key is not None and record.key_id != args.key:
            continue
        item = asdict(record)
        if not args.with_inputs:
            del item["inputs"]
        sys.stdout.write(json.dumps(item, separators=(",", ":")) + "\n")
    return 0
