"""Settings plumbing both tiers share: a TOML file, then secrets files, then environment.

``TierSettings.load`` takes explicit overrides on top of those. A value given as ``None`` is
given: it overrides (``metrics_port=None`` switches metrics off). A value not given is left
out, or passed as ``UNSET`` (``given(args.port)``: a command-line option that was not used).
"""

from __future__ import annotations

import os
import tomllib
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar

from pydantic import model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

SettingsT = TypeVar("SettingsT", bound="TierSettings")
T = TypeVar("T")


class Unset(Enum):
    """The type of ``UNSET``: an override that was not given (``None`` is a value)."""

    UNSET = "unset"


UNSET = Unset.UNSET


def given(value: T | None) -> T | Unset:
    """``UNSET`` for ``None``: for callers whose ``None`` means "not given" (argparse)."""
    return UNSET if value is None else value


class TierSettings(BaseSettings):
    """Base of each tier's settings. Priority: explicit values, environment, secrets, TOML."""

    model_config = SettingsConfigDict(extra="forbid", secrets_dir=None)

    tier_dir: Path
    # The tier's only writable folder (when unset: TIER_DIR/state, filled in from tier_dir).
    # Containers mount a volume outside the read-only tier folder and name it here
    # (SPLITVAULT_PUBLIC_STATE_DIR, SPLITVAULT_PRIVATE_STATE_DIR).
    state_dir: Path = Path("state")

    @model_validator(mode="before")
    @classmethod
    def _state_in_tier_dir_by_default(cls, data: Any) -> Any:
        if isinstance(data, dict) and not data.get("state_dir") and data.get("tier_dir"):
            return {**data, "state_dir": default_state_dir(Path(data["tier_dir"]))}
        return data

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml = TomlConfigSettingsSource(settings_cls)
        return init_settings, env_settings, file_secret_settings, toml

    @classmethod
    def load(
        cls: type[SettingsT],
        toml_file: Path | None = None,
        secrets_dir: Path | None = None,
        **overrides: Any,
    ) -> SettingsT:
        """Read settings from ``toml_file`` (if it exists), ``secrets_dir`` and the environment;
        ``overrides`` win over them all, ``None`` included, except those passed as ``UNSET``."""
        config = dict(cls.model_config)
        if toml_file is not None and toml_file.is_file():
            config["toml_file"] = toml_file
        if secrets_dir is not None and secrets_dir.is_dir():
            config["secrets_dir"] = secrets_dir
        bound = type(cls.__name__, (cls,), {"model_config": config, "__module__": cls.__module__})
        explicit = {key: value for key, value in overrides.items() if value is not UNSET}
        return bound(**explicit)  # type: ignore[no-any-return]


def default_state_dir(tier_dir: Path) -> Path:
    """Where a tier keeps its state when no ``state_dir`` is set."""
    return tier_dir / "state"


def configured_state_dir(tier_dir: Path, config_file: Path, env_prefix: str) -> Path:
    """A tier's ``state_dir`` as the tier itself resolves it (environment, then its TOML file,
    then the default), for operator commands that need only that setting."""
    value: object = os.environ.get(f"{env_prefix}STATE_DIR")
    if not value and config_file.is_file():
        value = tomllib.loads(config_file.read_text("utf-8")).get("state_dir")
    return Path(str(value)) if value else default_state_dir(tier_dir)
