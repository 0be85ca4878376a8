"""Private tier settings (``private.toml``, ``SPLITVAULT_PRIVATE_*`` environment, secrets)."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import SettingsConfigDict

from shared.layout import PRIVATE_IDENTITY, PUBLIC_IDENTITY
from shared.settings import TierSettings


class PrivateSettings(TierSettings):
    """Where the private tier's folder and KEK are, how it listens and whom it serves."""

    model_config = SettingsConfigDict(env_prefix="SPLITVAULT_PRIVATE_", extra="forbid")

    tier_dir: Path
    host: str = "127.0.0.1"
    port: int = Field(default=50051, ge=0, le=65535)
    kek_file: Path | None = None
    # Read from /run/secrets/kek (compose and Kubernetes secrets) when no file is named.
    kek: SecretStr | None = None
    allowed_identities: list[str] = Field(default_factory=lambda: [PUBLIC_IDENTITY])
    health_identities: list[str] = Field(
        default_factory=lambda: [PUBLIC_IDENTITY, PRIVATE_IDENTITY]
    )
    torch_threads: int = Field(default_factory=lambda: max(1, (os.cpu_count() or 2) // 2), ge=1)
    max_message_mb: int = Field(default=64, ge=4, le=2047)
    grace_period_s: float = Field(default=10.0, ge=0)
    lock_memory: bool = True
    # Prometheus metrics on a separate plain-HTTP port (internal network only); None: off.
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = Field(default=9464, ge=0, le=65535)
    log_level: str = "INFO"

    @model_validator(mode="after")
    def _needs_a_kek(self) -> PrivateSettings:
        if self.kek_file is None and self.kek is None:
            raise ValueError("no KEK: set kek_file or provide the secret 'kek'")
        return self
