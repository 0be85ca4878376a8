"""Settings of the private tier's activation monitor (``[activation_monitor]`` in private.toml,
``SPLITVAULT_PRIVATE_ACTIVATION_MONITOR__*``). Defaults tuned with ``bench/compromised_public.py``
on the digits demo: 0 alerts on clean and augmented held-out digits, crafted streams refused."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MonitorAction = Literal["record", "alert", "throttle", "refuse"]


class ActivationMonitorSettings(BaseModel):
    """What the monitor does at each level and the thresholds of its two CUSUM statistics.

    ``action``: ``record`` keeps scores and metrics only; ``alert`` also logs
    ``private_monitor_alert`` when a stream reaches a level; ``throttle`` also delays every
    request of a refused-level stream by ``throttle_delay_s``; ``refuse`` refuses them
    (PERMISSION_DENIED). Levels are sticky until the tier restarts.

    Each row gets a score in units of the reference's spread (0: the reference median, 1: its
    99% quantile; the largest of OOD distance and nearest-neighbour distance, both divided by
    ``distance_tolerance``, and share of zeros).
    ``shift`` sums ``min(score, shift_cap) - shift_drift`` (never below 0): a stream whose rows
    sit, on average, further out than natural ones (the whole stream off the manifold).
    ``rows`` sums log-likelihood ratios of a row being suspect, an outlier (score over
    ``outlier_score``) or a near duplicate of a recent row (closer than ``near_high`` but not
    closer than ``near_low`` times the reference's nearest-neighbour distance: a perturbation
    sweep), at rate ``crafted_rate`` against ``benign_rate``: crafted rows mixed into natural
    ones.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    action: MonitorAction = "refuse"
    rows_per_call: int = Field(default=64, ge=1, le=4096)
    window: int = Field(default=256, ge=8, le=4096)
    shift_drift: float = Field(default=1.5, gt=0)
    shift_cap: float = Field(default=4.0, gt=0)
    shift_alert: float = Field(default=40.0, gt=0)
    shift_refuse: float = Field(default=150.0, gt=0)
    # Distances (OOD, nearest neighbour) count as far only at this many times the reference's
    # spread: benign augmentations (a one-pixel shift) move them more than the share of zeros.
    distance_tolerance: float = Field(default=2.0, ge=1)
    outlier_score: float = Field(default=4.0, gt=0)
    near_low: float = Field(default=1e-3, ge=0)
    near_high: float = Field(default=0.05, gt=0)
    benign_rate: float = Field(default=0.01, gt=0, lt=1)
    crafted_rate: float = Field(default=0.1, gt=0, lt=1)
    rows_alert: float = Field(default=15.0, gt=0)
    # 30 nats: about 13 suspect rows in a row. Natural streams never reached the alert level in
    # bench/compromised_public.py; each crafted row answered is a label for a thief's copy.
    rows_refuse: float = Field(default=30.0, gt=0)
    throttle_delay_s: float = Field(default=1.0, ge=0, le=60)
    # Streams kept per model and scope; the least recently seen one below alert goes first.
    max_streams: int = Field(default=10_000, ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> ActivationMonitorSettings:
        if self.shift_alert > self.shift_refuse or self.rows_alert > self.rows_refuse:
            raise ValueError("an alert threshold is above its refusal threshold")
        if self.near_low >= self.near_high or self.benign_rate >= self.crafted_rate:
            raise ValueError("near_low < near_high and benign_rate < crafted_rate are required")
        return self
