"""Copies of the session deployment that a test may change (keys, certificates, KEK)."""

from __future__ import annotations

import shutil
from collections.abc import Collection
from pathlib import Path

from shared.layout import DeployLayout


def copy_deployment(
    source: DeployLayout,
    target: Path,
    *,
    skip_models: Collection[str] = ("minilm",),
    keep_public_state: bool = True,
) -> DeployLayout:
    """Copy ``source`` to ``target`` without the models named in ``skip_models`` (both tiers).

    Without ``keep_public_state`` the copy starts with no keys, acceptances or audit trail,
    and so with no private state either (ledger anchors of that trail, nonces, budgets).
    """
    models = {source.public.models, source.private.models}

    def ignore(folder: str, names: list[str]) -> list[str]:
        tiers = (source.public.root, source.private.root)
        if Path(folder) in tiers and not keep_public_state:
            return [name for name in names if name == "state"]
        return [name for name in names if Path(folder) in models and name in skip_models]

    shutil.copytree(source.root, target, ignore=ignore)
    return DeployLayout(target)


def pairing_id(deploy: Path | DeployLayout, model: str) -> str:
    """The pairing id the public tier sends with ``model``'s activations (its front manifest;
    public, so a caller holding the public folder sends it too). '' when packed without one."""
    from shared.manifest import read_manifest

    layout = deploy if isinstance(deploy, DeployLayout) else DeployLayout(deploy)
    return read_manifest(layout.public.model(model)).pairing_id or ""
