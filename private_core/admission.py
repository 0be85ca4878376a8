"""Admission in the private tier, whatever the public tier decided: budgets in samples.

Every call is counted, before it enters the batcher, against up to three budgets of its model
(``AdmissionSettings``), decided together so that a refusal consumes none of them:

* ``identity``: the calling public replica's certificate identity (its CN). A compromised
  public host holds one replica's certificate, so this bounds what it can extract.
* ``unsigned``: the same identity's traffic that no customer signed, a smaller budget.
  Requests carry no customer signature yet (issue 13, item 3): every ``Caller`` is unsigned
  until that change sets ``Caller.signed`` for a request whose signature verifies.
* ``key``: the API key id the public tier names, a second line only (asserted, not proven).

An identity or unsigned budget used up is ``IdentityBudgetExhausted`` (503 with Retry-After to
the customer: a service fault, alerted as ``private_budget_exhausted``); a key's, is
``KeyBudgetExhausted`` (429 for that key). Counters live in memory and are persisted through a
``CounterStore`` (``private_core.admission_store``) so a restart keeps the day's usage; or, with
several private replicas, in the private tier's own Redis (``private_core.private_redis_budgets``
decides there and hands the decisions to ``settle``).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

from prometheus_client import CollectorRegistry, Counter

from private_core.admission_settings import AdmissionSettings
from shared.errors import IdentityBudgetExhausted, InvalidInput, KeyBudgetExhausted
from shared.gcra import CounterState, Decision, LimitPolicy, check_states, utc_day
from shared.logs import get_logger

log = get_logger(__name__)
Clock = Callable[[], float]
BudgetName = Literal["identity", "unsigned", "key"]
Check = tuple[BudgetName, str, LimitPolicy]  # budget, subject (the counter's name), policy
IDENTITY_REFUSAL = "the private tier's budget for this public replica is used up"
KEY_REFUSAL = "the private tier's budget for this API key is used up"


@dataclass(frozen=True)
class Caller:
    """Who a call is counted against: the certificate identity the interceptor admitted, the
    key id the public tier asserts ("" for none), and whether a customer signed it."""

    identity: str
    key_id: str = ""
    signed: bool = False  # set once the customer's request signature verifies (attribution)


@dataclass(frozen=True)
class AdmissionMetrics:
    """Samples admitted and calls refused, by identity, model and budget."""

    admitted: Counter
    refused: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry) -> AdmissionMetrics:
        """Register on the tier's registry (identities are CNs from the deployment's own CA)."""
        return cls(
            admitted=Counter(
                "splitvault_private_admitted_samples_total",
                "Samples (batch rows) admitted by the private tier's budgets.",
                ["identity", "model"],
                registry=registry,
            ),
            refused=Counter(
                "splitvault_private_budget_refusals_total",
                "Calls refused by a private-tier budget (identity, unsigned or key).",
                ["identity", "model", "budget"],
                registry=registry,
            ),
        )


class Admission:
    """The budgets of one private replica, in memory; every check runs without awaiting."""

    def __init__(
        self,
        settings: AdmissionSettings,
        metrics: AdmissionMetrics | None = None,
        *,
        clock: Clock = time.monotonic,
        wall_clock: Clock = time.time,
    ) -> None:
        self._settings = settings
        self._metrics = metrics
        self._clock = clock
        self._wall_clock = wall_clock
        self._states: OrderedDict[str, CounterState] = OrderedDict()
        self._refusing: set[str] = set()  # subjects whose last call was refused (alert once)

    def admit(self, caller: Caller, model: str, samples: int) -> None:
        """Count ``samples`` rows of ``model`` for ``caller``, or raise without counting any."""
        checks = self.checks(caller, model)
        decisions, updates = check_states(
            [(self._states.get(subject), policy) for _, subject, policy in checks],
            samples,
            self._clock(),
            self._wall_clock(),
        )
        self.settle(caller, model, samples, checks, decisions)
        for (_, subject, _), state in zip(checks, updates, strict=True):
            self._states[subject] = state
            self._states.move_to_end(subject)
        self._evict()

    def checks(self, caller: Caller, model: str) -> list[Check]:
        """The budgets a call of ``caller`` to ``model`` is counted against (its subjects are
        the counters' names); ``InvalidInput`` for a key id longer than allowed."""
        if len(caller.key_id) > self._settings.max_key_id_chars:
            raise InvalidInput(f"key id longer than {self._settings.max_key_id_chars} characters")
        return self._checks(caller, model)

    def settle(
        self,
        caller: Caller,
        model: str,
        samples: int,
        checks: list[Check],
        decisions: list[Decision],
    ) -> None:
        """Act on the ``decisions`` for ``checks`` (these counters or a shared store's): raise
        the refusal (counted, alerted once) if any refused, else count the admitted samples."""
        refused = [
            (budget, subject, decision)
            for (budget, subject, _), decision in zip(checks, decisions, strict=True)
            if not decision.allowed
        ]
        if refused:
            self._refuse(caller, model, refused)
        for _, subject, _ in checks:
            self._refusing.discard(subject)
        if self._metrics is not None:
            self._metrics.admitted.labels(caller.identity, model).inc(samples)

    def _checks(self, caller: Caller, model: str) -> list[Check]:
        budgets = self._settings
        checks: list[Check] = [
            ("identity", f"identity:{caller.identity}:{model}", budgets.identity.policy())
        ]
        if not caller.signed:
            subject = f"unsigned:{caller.identity}:{model}"
            checks.append(("unsigned", subject, budgets.unsigned.policy()))
        if caller.key_id and budgets.key is not None:
            checks.append(("key", f"key:{caller.key_id}:{model}", budgets.key.policy()))
        return checks

    def _refuse(
        self, caller: Caller, model: str, refused: list[tuple[BudgetName, str, Decision]]
    ) -> None:
        """Count, alert (once per subject until it admits again) and raise the refusal."""
        service = [item for item in refused if item[0] != "key"]
        chosen = service or refused
        budget, subject, decision = max(chosen, key=lambda item: item[2].retry_after_s)
        if self._metrics is not None:
            self._metrics.refused.labels(caller.identity, model, budget).inc()
        for _, refused_subject, _ in chosen:  # a refused subject is recently seen too
            if refused_subject in self._states:
                self._states.move_to_end(refused_subject)
        retry_after_s = max(decision.retry_after_s, 1.0)
        if subject not in self._refusing:
            self._refusing.add(subject)
            self._alert(caller, model, budget, decision, retry_after_s)
        if service:
            raise IdentityBudgetExhausted(IDENTITY_REFUSAL, retry_after_s=retry_after_s)
        raise KeyBudgetExhausted(KEY_REFUSAL, retry_after_s=retry_after_s)

    def _alert(
        self,
        caller: Caller,
        model: str,
        budget: BudgetName,
        decision: Decision,
        retry_after_s: float,
    ) -> None:
        fields = {
            "identity": caller.identity,
            "model": model,
            "budget": budget,
            "limit": decision.limit_name,
            "retry_after_s": round(retry_after_s, 3),
        }
        if budget == "key":
            log.warning("private_key_budget_exhausted", key_id=caller.key_id, **fields)
        else:
            log.error("private_budget_exhausted", **fields)

    def _evict(self) -> None:
        while len(self._states) > self._settings.max_subjects:
            subject, _ = self._states.popitem(last=False)
            self._refusing.discard(subject)

    def snapshot(self) -> dict[str, CounterState]:
        """Every counter that still matters, ``tat`` on the wall clock (for a ``CounterStore``)."""
        now, wall = self._clock(), self._wall_clock()
        today, _ = utc_day(wall)
        return {
            subject: CounterState(state.tat - now + wall, state.day, state.used)
            for subject, state in self._states.items()
            if state.day == today or state.tat > now
        }

    def restore(self, counters: Mapping[str, CounterState]) -> None:
        """Load counters a ``snapshot`` gave (an earlier process's), replacing none newer."""
        offset = self._clock() - self._wall_clock()
        for subject, state in counters.items():
            if subject not in self._states:
                self._states[subject] = CounterState(state.tat + offset, state.day, state.used)
        self._evict()
