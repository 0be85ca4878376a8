"""``splitvault keys signer-create|signer-register|signer-remove|signers``: request signing keys.

``signer-create`` runs on the customer's machine and writes a new Ed25519 key there (the
SDK's ``create_signing_key``); only its public key leaves. The other commands run on the
operator's private or admin host and change the private tier's signer registry in its state
folder (``DEPLOY/private/state/signatures.sqlite3``, or the tier's ``state_dir``), or in its own
Redis when the private settings name one (``state_store``, several private replicas): never
through the public tier, whose host could register a key of its own. Every running private
replica sees a registration at once.
"""

from __future__ import annotations

import argparse
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported when a command runs, keeping the CLI quick to start
    from private_core.signers import SignatureState


def add_signer_commands(actions: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the signer commands to the ``keys`` group."""
    create = actions.add_parser(
        "signer-create", help="customer side: a new Ed25519 request-signing key file"
    )
    create.add_argument("--key-id", required=True, help="the API key id (k_...) it signs for")
    create.add_argument("--deployment", required=True, help="the id `keys signers` prints")
    create.add_argument("--out", required=True, type=Path, help="the key file to create (0600)")
    create.set_defaults(run=_create)
    register = actions.add_parser(
        "signer-register", help="private/admin host: register a customer's public signing key"
    )
    register.add_argument("--deploy", required=True, type=Path)
    register.add_argument("--key-id", required=True)
    register.add_argument("--public-key", required=True, help="ed25519:BASE64, from signer-create")
    register.set_defaults(run=_register)
    remove = actions.add_parser("signer-remove", help="private/admin host: remove a signer")
    remove.add_argument("--deploy", required=True, type=Path)
    remove.add_argument("--key-id", required=True)
    remove.set_defaults(run=_remove)
    listing = actions.add_parser("signers", help="the deployment id and the registered signers")
    listing.add_argument("--deploy", required=True, type=Path)
    listing.set_defaults(run=_list)


def _create(args: argparse.Namespace) -> int:
    from splitvault_client import create_signing_key

    public_key = create_signing_key(args.out, key_id=args.key_id, deployment=args.deployment)
    print(f"signing key written to {args.out} (keep it on this machine)")
    print("give the operator this public key to register:")
    print(f"  splitvault keys signer-register --key-id {args.key_id} --public-key {public_key}")
    return 0


def _register(args: argparse.Namespace) -> int:
    from shared.signatures import load_public_key

    key = load_public_key(args.public_key)
    with deployment_signature_state(args.deploy) as state:
        state.register(args.key_id, key)
    print(f"signer registered for {args.key_id}; its unsigned requests are now refused")
    print(f"deployment id: {_deployment(args.deploy)}")
    return 0


def _remove(args: argparse.Namespace) -> int:
    with deployment_signature_state(args.deploy) as state:
        removed = state.remove(args.key_id)
    print(f"signer removed for {args.key_id}" if removed else f"no signer for {args.key_id}")
    return 0 if removed else 1


def _list(args: argparse.Namespace) -> int:
    print(f"deployment id: {_deployment(args.deploy)}")
    with deployment_signature_state(args.deploy) as state:
        for key_id, public_key in state.signers().items():
            print(f"{key_id}  {public_key}")
    return 0


def _deployment(deploy: Path) -> str:
    from shared.layout import DeployLayout
    from shared.signatures import deployment_id

    return deployment_id(DeployLayout(deploy).private.ca_cert.read_bytes())


def deployment_signature_state(deploy: Path) -> closing[SignatureState]:
    """The private tier's signature state of a deployment (its state folder, or its private
    store), opened for one command."""
    from private_core.private_redis_settings import configured_state_store
    from private_core.settings import private_state_dir
    from private_core.signers import open_signature_state

    if not (deploy / "private").is_dir():
        raise FileNotFoundError(f"{deploy}/private does not exist")
    store = configured_state_store(deploy)
    # The window only sets how long nonces are kept: this command records none.
    return closing(open_signature_state(store, private_state_dir(deploy), window_s=1.0))
