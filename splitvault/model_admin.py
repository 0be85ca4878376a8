"""Models of a deployment folder, both tiers' copies at once: list, change policy, delete.

Each model has a public copy (``public/models/NAME``: front stage, config without watermark)
and a private copy (``private/models/NAME``: encrypted back stage, the authoritative config).
Editing one copy by hand leaves the tiers disagreeing; these functions change both or neither,
and say what disagrees. The tiers read their folders at start: restart both afterwards.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from private_core.watermark.keys import CHOICE_FILE, WATERMARK_KEY_FILE
from shared.layout import DeployLayout, TierDir
from shared.manifest import (
    CONFIG_FILE,
    ModelConfig,
    OutputPolicy,
    StageManifest,
    read_config,
    read_manifest,
)
from shared.pairing import mismatch_reason

RETIRED_DIR = "retired"  # private/retired/NAME-TIME/: watermark keys of deleted models


@dataclass(frozen=True)
class ModelCopy:
    """One tier's copy of a model: its config and manifest, or why they cannot be read."""

    config: ModelConfig | None = None
    manifest: StageManifest | None = None
    error: str | None = None


@dataclass(frozen=True)
class ModelEntry:
    """A model as both tiers' folders hold it (``None``: that tier has no copy)."""

    name: str
    public: ModelCopy | None
    private: ModelCopy | None
    problems: list[str] = field(default_factory=list)

    @property
    def config(self) -> ModelConfig | None:
        """The authoritative config: the private copy's, else the public one's."""
        for copy in (self.private, self.public):
            if copy is not None and copy.config is not None:
                return copy.config
        return None


def list_models(layout: DeployLayout) -> list[ModelEntry]:
    """Every model either tier's folder holds, with what the two copies disagree on."""
    names = _names(layout.public) | _names(layout.private)
    return [model_entry(layout, name) for name in sorted(names)]


def model_entry(layout: DeployLayout, name: str) -> ModelEntry:
    """Model ``name`` in both tiers' folders (``KeyError`` when neither has it)."""
    public, private = _read(layout.public, name), _read(layout.private, name)
    if public is None and private is None:
        raise KeyError(name)
    return ModelEntry(name, public, private, _problems(public, private))


def set_policy(layout: DeployLayout, name: str, policy: OutputPolicy) -> ModelConfig:
    """Give ``name`` a new output policy in both copies (private first); ``ValueError`` when a
    copy is missing or unreadable, or the policy does not fit the model."""
    public_config, private_config = _configs(layout, name)
    try:
        private = _with_policy(private_config, policy)
        public = _with_policy(public_config, policy)
    except ValidationError as error:
        raise ValueError(f"model {name!r}: {error.errors()[0]['msg']}") from None
    _write_config(layout.private.model(name), private)
    _write_config(layout.public.model(name), public)
    return private


def delete_model(layout: DeployLayout, name: str) -> Path | None:
    """Remove ``name`` from both tiers' folders; its watermark key is kept (encrypted) under
    ``private/retired/`` so that copies made from past answers stay provable. Returns where
    the key went (``None``: the model had none)."""
    model_entry(layout, name)  # KeyError when neither tier has it
    key = layout.private.model(name) / WATERMARK_KEY_FILE
    kept = None
    if key.exists():
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
        kept = layout.private.root / RETIRED_DIR / f"{name}-{stamp}" / WATERMARK_KEY_FILE
        kept.parent.mkdir(parents=True, mode=0o700)
        shutil.copy2(key, kept)
        shutil.copy2(layout.private.model(name) / CONFIG_FILE, kept.parent / CONFIG_FILE)
        if (choice := layout.private.model(name) / CHOICE_FILE).exists():  # the draws, issue 14
            shutil.copy2(choice, kept.parent / CHOICE_FILE)
    for tier in (layout.public, layout.private):
        _remove(tier.model(name))
    return kept


def _names(tier: TierDir) -> set[str]:
    if not tier.models.is_dir():
        return set()
    return {path.name for path in tier.models.iterdir() if path.is_dir()}


def _read(tier: TierDir, name: str) -> ModelCopy | None:
    folder = tier.model(name)
    if not folder.is_dir():
        return None
    try:
        return ModelCopy(read_config(folder), read_manifest(folder))
    except (OSError, ValueError, ValidationError) as error:
        return ModelCopy(error=f"unreadable config or manifest ({type(error).__name__})")


def _problems(public: ModelCopy | None, private: ModelCopy | None) -> list[str]:
    problems = [
        f"{tier} copy {copy.error}"
        for tier, copy in (("public", public), ("private", private))
        if copy is not None and copy.error is not None
    ]
    if public is None or private is None:
        missing = "public" if public is None else "private"
        return [*problems, f"no {missing} copy (half-deleted or half-copied)"]
    if public.manifest is not None and private.manifest is not None:
        name = private.manifest.model
        mismatch = mismatch_reason(name, public.manifest.pairing_id, private.manifest.pairing_id)
        problems += [mismatch] if mismatch else []
    if public.config is not None and private.config is not None:
        differ = _config_differences(public.config, private.config)
        problems += [f"configs differ in: {', '.join(differ)}"] if differ else []
    return problems


def _config_differences(public: ModelConfig, private: ModelConfig) -> list[str]:
    """Fields the two configs disagree on (the public copy never holds the watermark)."""
    ours, theirs = public.model_dump(exclude={"watermark"}), private.model_dump()
    return [key for key in ours if ours[key] != theirs[key]]


def _configs(layout: DeployLayout, name: str) -> tuple[ModelConfig, ModelConfig]:
    """The public and private configs of ``name``; ``ValueError`` unless both are readable."""
    entry = model_entry(layout, name)
    configs = []
    for tier, copy in (("public", entry.public), ("private", entry.private)):
        if copy is None or copy.config is None:
            raise ValueError(f"model {name!r} has no readable {tier} copy: fix or delete it")
        configs.append(copy.config)
    return configs[0], configs[1]


def _with_policy(config: ModelConfig, policy: OutputPolicy) -> ModelConfig:
    """``config`` with ``policy``, validated again (the policy must fit task and watermark)."""
    return ModelConfig.model_validate({**config.model_dump(), "policy": policy.model_dump()})


def _write_config(folder: Path, config: ModelConfig) -> None:
    """Replace ``folder/config.json`` atomically."""
    partial = folder / (CONFIG_FILE + ".partial")
    partial.write_text(config.model_dump_json(indent=2) + "\n", encoding="utf-8")
    with partial.open("rb") as written:
        os.fsync(written.fileno())
    partial.replace(folder / CONFIG_FILE)


def _remove(folder: Path) -> None:
    """Take ``folder`` out of its models folder in one rename, then delete it."""
    if not folder.exists():
        return
    doomed = folder.parent.parent / f".deleting-{folder.name}-{os.getpid()}"
    folder.rename(doomed)
    shutil.rmtree(doomed)


def describe(entry: ModelEntry) -> dict[str, object]:
    """A JSON-ready summary of a model (``models show``)."""
    config = entry.config
    copies = {"public": entry.public, "private": entry.private}
    return {
        "name": entry.name,
        "task": None if config is None else config.task,
        "policy": None if config is None else config.policy.model_dump(),
        "labels": None if config is None else config.labels,
        "max_batch_size": None if config is None else config.max_batch_size,
        "watermark": _watermark(entry),
        "copies": {
            tier: None if copy is None else _copy_summary(copy) for tier, copy in copies.items()
        },
        "problems": entry.problems,
    }


def _copy_summary(copy: ModelCopy) -> dict[str, object]:
    manifest = copy.manifest
    return {
        "error": copy.error,
        "pairing_id": None if manifest is None else manifest.pairing_id,
        "file": None if manifest is None else manifest.file,
        "torch_version": None if manifest is None else manifest.torch_version,
    }


def _watermark(entry: ModelEntry) -> object:
    config = entry.private.config if entry.private is not None else None
    if config is None or config.watermark is None:
        return None
    return json.loads(config.watermark.model_dump_json())
