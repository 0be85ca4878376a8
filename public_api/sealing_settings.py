"""``[sealing]`` in public.toml: sealed request bodies, their bounds and the terms they imply."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class SealingSettings(BaseModel):
    """Each served request's body, sealed to the owner's public key (``public/owner.pub``).

    On by default once the owner's public key is in the tier's folder (``splitvault owner
    keygen``). Retention is per API key, so that one key's traffic never evicts another's:
    at most ``max_records_per_key`` bodies and ``max_bytes_per_key`` sealed bytes (oldest
    deleted first), none older than ``retention_days``. ``max_pending`` requests may wait for
    the writer; beyond that, or while it cannot write, requests are refused (503).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    max_records_per_key: int = Field(default=50_000, ge=1, le=10_000_000)
    max_bytes_per_key: int = Field(default=512 << 20, ge=1 << 16)
    retention_days: float = Field(default=365.0, gt=0, le=3650)
    max_pending: int = Field(default=10_000, ge=1, le=1_000_000)
