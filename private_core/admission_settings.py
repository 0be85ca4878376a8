"""Settings of the private tier's own admission: budgets in samples per certificate identity.

``[admission]`` in private.toml, or ``SPLITVAULT_PRIVATE_ADMISSION__*`` variables (for example
``SPLITVAULT_PRIVATE_ADMISSION__UNSIGNED__DAILY_BUDGET=200000``). A sample is one row of a
request's batch dimension. Every budget is per model and per private replica (each counts on
its own). Size them from the public keys' quotas: see README.md, "Private-tier admission".
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from shared.gcra import LimitPolicy


class BudgetSettings(BaseModel):
    """A GCRA rate (samples a second, ``burst`` at once) and a budget of samples per UTC day.

    ``burst`` must hold the largest batch a model accepts, or such a batch is always refused.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    rate_per_s: float = Field(gt=0)
    burst: int = Field(ge=1)
    daily_budget: int = Field(ge=1)

    def policy(self) -> LimitPolicy:
        """The same limits as the shared GCRA arithmetic takes them."""
        return LimitPolicy(self.rate_per_s, self.burst, self.daily_budget)


class AdmissionSettings(BaseModel):
    """Budgets the private tier enforces whatever the public tier did.

    ``identity``: per public replica's certificate identity. ``unsigned``: the part of an
    identity's traffic that no customer signed (all of it until requests carry signatures),
    smaller. ``key``: per API key id the public tier names, a second line only (a compromised
    public tier names whatever key it likes); None: off. The defaults are far above what the
    public tier's default key limits (20 samples/s, 20,000 a day) let 50 keys send.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    identity: BudgetSettings = BudgetSettings(rate_per_s=2000.0, burst=8192, daily_budget=5_000_000)
    unsigned: BudgetSettings = BudgetSettings(rate_per_s=1000.0, burst=4096, daily_budget=2_000_000)
    key: BudgetSettings | None = BudgetSettings(
        rate_per_s=1000.0, burst=4096, daily_budget=1_000_000
    )
    # Counters are written to the state folder this often (and at shutdown), so a restart
    # keeps the day's usage; a crash loses at most this many seconds of it.
    persist_interval_s: float = Field(default=10.0, gt=0, le=3600)
    # Subjects (identity, key and model) remembered; the least recently seen go first. Only
    # key ids, which the public tier asserts, can be many.
    max_subjects: int = Field(default=100_000, ge=16)
    # The longest key id the tier accepts (longer: INVALID_ARGUMENT).
    max_key_id_chars: int = Field(default=128, ge=8, le=1024)
