"""Settings of the public tier's abuse protection: keys, terms, limits, monitor, audit."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from public_api.anchor_settings import AnchorSettings


class LimitSettings(BaseModel):
    """A burst-tolerant rate (GCRA: rate plus burst) and a daily quota, counted in samples.

    A sample is one row of a request's batch dimension: a request of 64 images costs 64. The
    burst must hold the largest batch a model accepts (64 by default), or such a batch is
    always refused.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    rate_per_s: float = Field(default=20.0, gt=0)
    burst: int = Field(default=128, ge=1)
    daily_quota: int | None = Field(default=20_000, ge=1)


class ProtectionSettings(BaseModel):
    """``[protection]`` in public.toml, or ``SPLITVAULT_PUBLIC_PROTECTION__*`` variables."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    require_api_key: bool = True
    # How long a key's authentication and accepted terms are remembered: a revocation or
    # acceptance made elsewhere (CLI, another replica) takes effect within this time; 0: never.
    key_cache_s: float = Field(default=5.0, ge=0, le=300)
    terms_version: str = Field(default="1", min_length=1, max_length=64)
    rate_limit_backend: Literal["memory", "redis"] = "memory"
    redis_url: str | None = None
    # Redis unreachable: refuse with 503 (default) or, if true, serve without limits and log.
    redis_fail_open: bool = False
    key_limits: LimitSettings = LimitSettings()
    ip_limits: LimitSettings = LimitSettings(rate_per_s=100.0, burst=256, daily_quota=None)
    # Per address, before authentication, failed authentications only (in requests): beyond
    # it 429 instead of 401. A valid key is never refused by it, so clients behind one NAT are
    # not locked out by someone else's failures.
    unauthenticated_limits: LimitSettings = LimitSettings(
        rate_per_s=1.0, burst=20, daily_quota=None
    )
    # Per-model overrides of the per-key limits; a key's own overrides win over both.
    model_limits: dict[str, LimitSettings] = Field(default_factory=dict)
    monitor_enabled: bool = True
    monitor_action: Literal["record", "alert", "throttle", "block"] = "block"
    throttle_factor: float = Field(default=0.1, gt=0, le=1)
    # Sybil key groups (public_api/monitor/groups.py): every ``group_interval_s`` seconds the
    # keys served in the last ``group_window_s`` seconds that share an address, a /64, a terms
    # address or a crafted query distribution are scored together and acted on together; an
    # address shared by more than ``group_crowd`` keys (a proxy, a carrier NAT) links none.
    groups_enabled: bool = True
    group_interval_s: float = Field(default=30.0, gt=0, le=3600)
    group_window_s: float = Field(default=7 * 86400.0, gt=0, le=90 * 86400.0)
    group_crowd: int = Field(default=50, ge=2)
    audit_enabled: bool = True
    # When the audit trail cannot write (disk full, read-only, locked): "refuse" answers 503 at
    # once; "buffer" keeps serving while at most ``audit_buffer_max`` records wait in memory,
    # writes them when storage recovers, and answers 503 once the buffer is full. Either way
    # no served request goes unrecorded.
    audit_on_failure: Literal["refuse", "buffer"] = "refuse"
    audit_buffer_max: int = Field(default=10_000, ge=1, le=1_000_000)
    # Refusals without a valid key (401, 429 before authentication, connection-limit 503, ...)
    # are recorded as one record per address, model and outcome per this many seconds.
    audit_aggregate_s: float = Field(default=10.0, gt=0, le=3600)
    # Anchoring of the audit trail in the private tier's ledger (public_api/audit_anchor.py).
    audit_anchor: AnchorSettings = AnchorSettings()
    # Customer request signatures (public_api.signing): key ids whose unsigned requests are
    # refused here (401; the private tier refuses them anyway once their signer is registered),
    # and how far a signature's time may be from this tier's clock, in seconds.
    require_signature_keys: list[str] = Field(default_factory=list)
    signature_window_s: float = Field(default=300.0, gt=0, le=86400)
