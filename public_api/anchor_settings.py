"""Settings of audit anchoring: ``[protection.audit_anchor]`` in public.toml, or
``SPLITVAULT_PUBLIC_PROTECTION__AUDIT_ANCHOR__*`` variables."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class AnchorSettings(BaseModel):
    """How often the private tier countersigns the audit trail's head, and how much of the
    trail may wait unanchored before new inference requests are refused (503, Retry-After)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Off: the trail is never anchored (an unsafe setting, reported as such).
    enabled: bool = True
    # Anchor as soon as this many records wait unanchored, and at least every every_s seconds
    # while any does.
    every_records: int = Field(default=1000, ge=1, le=1_000_000)
    every_s: float = Field(default=10.0, gt=0, le=3600)
    # While anchoring fails (private tier unreachable, its ledger refusing), records wait:
    # once max_unanchored_records wait, or the oldest has waited max_unanchored_s, new
    # inference requests get 503 until an anchor succeeds again.
    max_unanchored_records: int = Field(default=20_000, ge=1, le=10_000_000)
    max_unanchored_s: float = Field(default=300.0, gt=0, le=86_400)
    # A failed anchor is retried after retry_s; one call may take timeout_s.
    retry_s: float = Field(default=1.0, gt=0, le=60)
    timeout_s: float = Field(default=5.0, gt=0, le=60)

    @model_validator(mode="after")
    def _bounds_above_cadence(self) -> AnchorSettings:
        if self.max_unanchored_records <= self.every_records:
            raise ValueError("max_unanchored_records must exceed every_records")
        if self.max_unanchored_s <= self.every_s:
            raise ValueError("max_unanchored_s must exceed every_s")
        return self
