"""The private tier's admission arithmetic: budgets per identity, unsigned traffic and key, in
samples; refusals that consume nothing; counters that survive a restart."""

from __future__ import annotations

import json
import stat
from datetime import UTC, datetime
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from private_core.admission import Admission, AdmissionMetrics, Caller
from private_core.admission_settings import AdmissionSettings, BudgetSettings
from private_core.admission_store import AdmissionStateError, FileCounterStore
from shared.errors import IdentityBudgetExhausted, InvalidInput, KeyBudgetExhausted, mapping_for

NOON = datetime(2025, 3, 4, 12, 0, tzinfo=UTC).timestamp()
REPLICA_1 = Caller("splitvault-public-1")
REPLICA_2 = Caller("splitvault-public-2")


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def _settings(
    identity: int = 1000, unsigned: int = 500, key: int | None = 100, **extra: object
) -> AdmissionSettings:
    """Daily budgets as given; rates high enough to stay out of the way."""

    def budget(daily: int) -> BudgetSettings:
        return BudgetSettings(rate_per_s=1e6, burst=1000, daily_budget=daily)

    return AdmissionSettings(
        identity=budget(identity),
        unsigned=budget(unsigned),
        key=None if key is None else budget(key),
        **extra,  # type: ignore[arg-type]
    )


class Tier:
    """An ``Admission`` on hand-moved clocks (monotonic and wall), with its metrics."""

    def __init__(self, settings: AdmissionSettings, wall: float = NOON, mono: float = 50.0):
        self.wall, self.mono = FakeClock(wall), FakeClock(mono)
        self.registry = CollectorRegistry()
        metrics = AdmissionMetrics.create(self.registry)
        self.admission = Admission(settings, metrics, clock=self.mono, wall_clock=self.wall)

    def advance(self, seconds: float) -> None:
        self.wall.advance(seconds)
        self.mono.advance(seconds)

    def metric(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0


def test_samples_count_against_the_identity_until_its_budget_is_used() -> None:
    tier = Tier(_settings(identity=100, unsigned=1000, key=None))
    tier.admission.admit(REPLICA_1, "digits", 64)
    tier.admission.admit(REPLICA_1, "digits", 36)  # exactly the budget
    with pytest.raises(IdentityBudgetExhausted) as refused:
        tier.admission.admit(REPLICA_1, "digits", 1)
    assert mapping_for(refused.value).http_status == 503
    # Until UTC midnight, twelve hours away.
    assert refused.value.retry_after_s == pytest.approx(12 * 3600)
    labels = {"identity": "splitvault-public-1", "model": "digits"}
    assert tier.metric("splitvault_private_admitted_samples_total", **labels) == 100
    refusals = "splitvault_private_budget_refusals_total"
    assert tier.metric(refusals, **labels, budget="identity") == 1


def test_each_identity_and_each_model_has_its_own_budget() -> None:
    tier = Tier(_settings(identity=10, unsigned=1000, key=None))
    tier.admission.admit(REPLICA_1, "digits", 10)
    with pytest.raises(IdentityBudgetExhausted):
        tier.admission.admit(REPLICA_1, "digits", 1)
    tier.admission.admit(REPLICA_2, "digits", 10)
    tier.admission.admit(REPLICA_1, "minilm", 10)


def test_the_budget_comes_back_at_utc_midnight() -> None:
    tier = Tier(_settings(identity=10, unsigned=1000, key=None))
    tier.admission.admit(REPLICA_1, "digits", 10)
    tier.advance(12 * 3600 - 1)
    with pytest.raises(IdentityBudgetExhausted):
        tier.admission.admit(REPLICA_1, "digits", 1)
    tier.advance(1)
    tier.admission.admit(REPLICA_1, "digits", 10)


def test_unsigned_traffic_has_its_own_smaller_budget() -> None:
    tier = Tier(_settings(identity=100, unsigned=30, key=None))
    tier.admission.admit(REPLICA_1, "digits", 30)
    with pytest.raises(IdentityBudgetExhausted):
        tier.admission.admit(REPLICA_1, "digits", 1)
    signed = Caller("splitvault-public-1", signed=True)
    tier.admission.admit(signed, "digits", 70)  # the identity's remainder, signed traffic only
    with pytest.raises(IdentityBudgetExhausted):
        tier.admission.admit(signed, "digits", 1)
    labels = {"identity": "splitvault-public-1", "model": "digits"}
    assert tier.metric("splitvault_private_budget_refusals_total", **labels, budget="unsigned") == 1


def test_a_key_over_its_second_line_budget_gets_429_and_consumes_nothing() -> None:
    tier = Tier(_settings(identity=100, unsigned=100, key=20))
    keyed = Caller("splitvault-public-1", key_id="k_abc")
    tier.admission.admit(keyed, "digits", 20)
    with pytest.raises(KeyBudgetExhausted) as refused:
        tier.admission.admit(keyed, "digits", 5)
    assert mapping_for(refused.value).http_status == 429
    # The refusal took nothing from the identity: 80 samples are left for other keys.
    tier.admission.admit(Caller("splitvault-public-1", key_id="k_other"), "digits", 20)
    tier.admission.admit(REPLICA_1, "digits", 60)
    with pytest.raises(IdentityBudgetExhausted):
        tier.admission.admit(REPLICA_1, "digits", 1)


def test_a_key_is_counted_across_identities() -> None:
    tier = Tier(_settings(identity=100, unsigned=100, key=20))
    tier.admission.admit(Caller("splitvault-public-1", key_id="k_abc"), "digits", 15)
    with pytest.raises(KeyBudgetExhausted):
        tier.admission.admit(Caller("splitvault-public-2", key_id="k_abc"), "digits", 6)


def test_when_identity_and_key_both_refuse_the_service_refusal_wins() -> None:
    tier = Tier(_settings(identity=10, unsigned=100, key=10))
    keyed = Caller("splitvault-public-1", key_id="k_abc")
    tier.admission.admit(keyed, "digits", 10)
    with pytest.raises(IdentityBudgetExhausted):
        tier.admission.admit(keyed, "digits", 1)


def test_no_key_budget_when_it_is_off_or_no_key_is_named() -> None:
    tier = Tier(_settings(identity=100, unsigned=100, key=None))
    tier.admission.admit(Caller("splitvault-public-1", key_id="k_abc"), "digits", 100)
    tier = Tier(_settings(identity=100, unsigned=100, key=1))
    tier.admission.admit(REPLICA_1, "digits", 100)


def test_the_rate_refuses_beyond_the_burst_until_it_refills() -> None:
    settings = _settings().model_copy(
        update={"identity": BudgetSettings(rate_per_s=10, burst=64, daily_budget=10_000)}
    )
    tier = Tier(settings)
    tier.admission.admit(REPLICA_1, "digits", 64)
    with pytest.raises(IdentityBudgetExhausted) as refused:
        tier.admission.admit(REPLICA_1, "digits", 10)
    assert refused.value.retry_after_s == pytest.approx(1.0)  # 10 samples at 10 a second
    tier.advance(0.9)
    with pytest.raises(IdentityBudgetExhausted):
        tier.admission.admit(REPLICA_1, "digits", 10)
    tier.advance(0.1)
    tier.admission.admit(REPLICA_1, "digits", 10)


def test_a_batch_larger_than_the_burst_is_always_refused() -> None:
    settings = _settings().model_copy(
        update={"identity": BudgetSettings(rate_per_s=10, burst=64, daily_budget=10_000)}
    )
    tier = Tier(settings)
    with pytest.raises(IdentityBudgetExhausted):
        tier.admission.admit(REPLICA_1, "digits", 65)
    tier.advance(3600)
    with pytest.raises(IdentityBudgetExhausted):
        tier.admission.admit(REPLICA_1, "digits", 65)


def test_the_alert_is_logged_once_until_the_subject_admits_again() -> None:
    settings = _settings().model_copy(
        update={"identity": BudgetSettings(rate_per_s=10, burst=10, daily_budget=10_000)}
    )
    tier = Tier(settings)
    tier.admission.admit(REPLICA_1, "digits", 10)
    with capture_logs() as logs:
        for _ in range(5):
            with pytest.raises(IdentityBudgetExhausted):
                tier.admission.admit(REPLICA_1, "digits", 5)
        tier.advance(1.0)
        tier.admission.admit(REPLICA_1, "digits", 5)
        with pytest.raises(IdentityBudgetExhausted):
            tier.admission.admit(REPLICA_1, "digits", 10)
    alerts = [entry for entry in logs if entry["event"] == "private_budget_exhausted"]
    assert len(alerts) == 2
    assert alerts[0]["identity"] == "splitvault-public-1"
    assert (alerts[0]["model"], alerts[0]["budget"], alerts[0]["limit"]) == (
        "digits",
        "identity",
        "burst",
    )


def test_an_overlong_key_id_is_invalid() -> None:
    tier = Tier(_settings())
    with pytest.raises(InvalidInput, match="key id"):
        tier.admission.admit(Caller("splitvault-public-1", key_id="k" * 129), "digits", 1)


def test_only_the_least_recently_seen_subjects_are_evicted() -> None:
    tier = Tier(_settings(identity=10_000, unsigned=10_000, key=5, max_subjects=16))
    tier.admission.admit(REPLICA_1, "digits", 1)
    for n in range(40):  # fake key ids, as a compromised public tier could send
        tier.admission.admit(Caller("splitvault-public-2", key_id=f"k_{n}"), "digits", 1)
        tier.admission.admit(REPLICA_1, "digits", 1)
    assert len(tier.admission.snapshot()) == 16
    assert tier.admission.snapshot()["identity:splitvault-public-1:digits"].used == 41


def test_counters_survive_a_restart_through_the_store(tmp_path: Path) -> None:
    store = FileCounterStore(tmp_path)
    before = Tier(_settings(identity=100, unsigned=1000, key=None))
    before.admission.admit(REPLICA_1, "digits", 90)
    store.save(before.admission.snapshot())
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    # A new process: another monotonic clock, ten minutes later.
    after = Tier(_settings(identity=100, unsigned=1000, key=None), NOON + 600, mono=7.0)
    after.admission.restore(store.load())
    after.admission.admit(REPLICA_1, "digits", 10)
    with pytest.raises(IdentityBudgetExhausted):
        after.admission.admit(REPLICA_1, "digits", 1)
    # The next day, the restored counters no longer count.
    tomorrow = Tier(_settings(identity=100, unsigned=1000, key=None), NOON + 86_400, mono=3.0)
    tomorrow.admission.restore(store.load())
    tomorrow.admission.admit(REPLICA_1, "digits", 100)


def test_a_restored_burst_keeps_its_theoretical_arrival_time(tmp_path: Path) -> None:
    settings = _settings().model_copy(
        update={"identity": BudgetSettings(rate_per_s=1, burst=10, daily_budget=10_000)}
    )
    before = Tier(settings)
    before.admission.admit(REPLICA_1, "digits", 10)
    after = Tier(settings, NOON + 2, mono=1e6)
    after.admission.restore(before.admission.snapshot())
    with pytest.raises(IdentityBudgetExhausted):
        after.admission.admit(REPLICA_1, "digits", 3)  # two of ten refilled
    after.admission.admit(REPLICA_1, "digits", 2)


@pytest.mark.parametrize(
    "content",
    ["not json", '{"version": 2, "counters": {}}', '{"version": 1, "counters": {"s": [1]}}', "[]"],
    ids=["garbage", "version", "short-entry", "not-an-object"],
)
def test_an_unreadable_store_refuses_rather_than_starting_over(
    tmp_path: Path, content: str
) -> None:
    store = FileCounterStore(tmp_path)
    store.path.parent.mkdir(parents=True)
    store.path.write_text(content)
    with capture_logs() as logs, pytest.raises(AdmissionStateError):
        store.load()
    assert [entry["event"] for entry in logs] == ["admission_state_unreadable"]


def test_a_missing_store_is_an_empty_one(tmp_path: Path) -> None:
    assert FileCounterStore(tmp_path).load() == {}
    FileCounterStore(tmp_path).save({})
    assert json.loads((tmp_path / "admission" / "counters.json").read_text())["counters"] == {}
