"""Settings of the private tier's shared store: its own Redis on the private network.

``[state_store]`` in private.toml, or ``SPLITVAULT_PRIVATE_STATE_STORE__*`` variables. Unset
(the default), each private replica keeps its budgets, nonces and signer registrations in its
own state folder: right for one private replica. With several, set ``redis_url`` so that a
signed request is answered once across all of them and a budget is not multiplied by their
number (README.md, "Several private replicas").

The store must be the private tier's own: a Redis the public tier can reach could be written
by a host that owns the public tier (its budgets reset, its nonces forgotten, its own signing
key registered). So a password is required, read from a file (a mounted secret), never written
in the URL; the tier refuses to start when its store answers without that password, or when it
is the store the deployment's public settings name (``private_core.private_redis``).
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from shared.layout import DeployLayout
from shared.settings import TierSettings

SCHEMES = ("redis", "rediss", "unix")


class StateStoreSettings(BaseModel):
    """Where the private tier's shared state lives (None: each replica's own folder)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # redis://HOST:6379/0, rediss://HOST:6380/0 (TLS) or unix:///PATH?db=0; no credentials.
    redis_url: str | None = None
    # The Redis user (ACL); None: the default user, authenticated by password alone.
    username: str | None = Field(default=None, min_length=1, max_length=128)
    # The password, from a file (a mounted secret): this file, else the value given directly.
    password_file: Path | None = None
    password: SecretStr | None = None
    # rediss:// only: the CA that signed the store's certificate (None: the system's).
    tls_ca_file: Path | None = None
    # Every wait on the store (connect, command) is bounded by this; past it, refused (503).
    timeout_s: float = Field(default=0.5, gt=0, le=30)
    # Key prefix, so that one private Redis can hold several deployments.
    prefix: str = Field(default="splitvault:private:", min_length=1, max_length=64)

    @field_validator("redis_url")
    @classmethod
    def _no_credentials_in_url(cls, url: str | None) -> str | None:
        if url is None:
            return None
        parts = urlsplit(url)
        if parts.scheme not in SCHEMES:
            raise ValueError(f"state_store.redis_url: scheme must be one of {', '.join(SCHEMES)}")
        if parts.username or parts.password:
            raise ValueError(
                "state_store.redis_url carries credentials: put the password in a secret file "
                "(state_store.password_file) and the user in state_store.username"
            )
        return url

    @model_validator(mode="after")
    def _needs_a_password(self) -> StateStoreSettings:
        if self.redis_url is not None and self.password_file is None and self.password is None:
            raise ValueError(
                "state_store.redis_url needs a password of the private store's own "
                "(state_store.password_file): a store without one is open to the public tier"
            )
        return self

    def secret(self) -> str:
        """The password (from ``password_file`` when set); ``ValueError`` when empty."""
        if self.password_file is not None:
            value = self.password_file.read_text("utf-8").strip()
        else:
            value = self.password.get_secret_value() if self.password is not None else ""
        if not value:
            raise ValueError("the private store's password is empty")
        return value


class _StoreOnly(TierSettings):
    """The private settings' ``state_store`` alone, for operator commands on an admin host."""

    model_config = SettingsConfigDict(
        env_prefix="SPLITVAULT_PRIVATE_", env_nested_delimiter="__", extra="ignore"
    )

    state_store: StateStoreSettings = Field(default_factory=StateStoreSettings)


def configured_state_store(deploy: Path) -> StateStoreSettings:
    """A deployment's private store as the private tier resolves it (environment, secrets,
    then ``private.toml``), so that ``keys signer-register`` writes where the tier reads."""
    layout = DeployLayout(deploy)
    return _StoreOnly.load(
        layout.private_config, secrets_dir=Path("/run/secrets"), tier_dir=layout.private.root
    ).state_store
