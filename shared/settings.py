"""Settings plumbing both tiers share: a TOML file, then secrets files, then environment."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

SettingsT = TypeVar("SettingsT", bound="TierSettings")


class TierSettings(BaseSettings):
    """Base of each tier's settings. Priority: explicit values, environment, secrets, TOML."""

    model_config = SettingsConfigDict(extra="forbid", secrets_dir=None)

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
        """Read settings from ``toml_file`` (if it exists), ``secrets_dir`` and the environment."""
        config = dict(cls.model_config)
        if toml_file is not None and toml_file.is_file():
            config["toml_file"] = toml_file
        if secrets_dir is not None and secrets_dir.is_dir():
            config["secrets_dir"] = secrets_dir
        bound = type(cls.__name__, (cls,), {"model_config": config, "__module__": cls.__module__})
        explicit = {key: value for key, value in overrides.items() if value is not None}
        return bound(**explicit)  # type: ignore[no-any-return]
