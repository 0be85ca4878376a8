"""The gate between a request and the model: API key, terms, monitor, limits, audit, metrics.

Order for an inference request: authenticate, before the body is read (401; a failure is
charged to the address's own bucket, 429 once it is empty) -> current terms accepted (403) -> key
not blocked by the extraction monitor (403) -> the audit trail can take a record (503) -> the
body is decoded (400, 404, 413) -> per-key and per-address limits and quotas, charged one unit
per sample (429) -> inference -> the monitor observes the answer -> one audit record.

Every outcome is audited once (``record_outcome``; the routes call ``record_served``): under the
key when one was recognised, else counted per address and interval (``AuditTrail.tally``). A
rejected request computes nothing. Under the ``"refuse"`` audit policy an answer is sent only
once its record is committed (``AuditTrail.submit``); an answer whose record the trail refuses,
or whose commit fails, is not sent (503, and that outcome is recorded instead); a refusal the
trail cannot take is logged instead.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from public_api.addresses import limit_subject
from public_api.audit import AuditRecord, input_digest
from public_api.audit_tally import Tallied
from public_api.audit_writer import AuditTrail
from public_api.context import RequestContext, decision_for_status
from public_api.key_cache import KeyCache, KnownCaller
from public_api.keys import ApiKey, KeyStore, hash_token
from public_api.metrics import PublicMetrics
from public_api.monitor import Assessment, ExtractionMonitor
from public_api.monitor.groups import KeyGroups
from public_api.protection_settings import LimitSettings, ProtectionSettings
from public_api.ratelimit import LimitPolicy, RateLimiter, policy_header, ratelimit_headers
from public_api.service import InferenceOutcome
from public_api.terms import Terms
from shared import phases
from shared.errors import (
    KeyBlocked,
    PermissionDenied,
    QuotaExceeded,
    RateLimited,
    TermsNotAccepted,
    Unauthenticated,
    Unavailable,
)
from shared.logs import get_logger
from shared.manifest import TensorSpec

log = get_logger(__name__)
ANONYMOUS = "anonymous"


@dataclass
class Caller:
    """Who is calling, as established by the gate."""

    client: str
    key: ApiKey | None = None
    accepted_terms: str | None = None  # terms version the key accepted most recently
    assessment: Assessment | None = None
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def key_id(self) -> str | None:
        return None if self.key is None else self.key.key_id


class Protection:
    """Runs the checks in order and records what happened."""

    def __init__(
        self,
        settings: ProtectionSettings,
        *,
        keys: KeyStore | None,
        terms: Terms,
        limiter: RateLimiter,
        monitor: ExtractionMonitor | None,
        audit: AuditTrail | None,
        metrics: PublicMetrics,
        key_cache: KeyCache | None = None,
        groups: KeyGroups | None = None,
    ) -> None:
        self.settings = settings
        self.keys = keys
        self.key_cache = key_cache or KeyCache()
        self.terms = terms
        self.limiter = limiter
        self.monitor = monitor
        self.audit = audit
        self.metrics = metrics
        self.groups = groups

    async def start(self) -> None:
        """Start the background work: the key groups' periodic pass."""
        if self.groups is not None:
            await self.groups.start()

    async def authenticate(self, authorization: str | None, client: str) -> Caller:
        """The caller behind an ``Authorization: Bearer KEY`` header (401 if required and bad)."""
        if self.keys is None or not self.settings.require_api_key:
            return Caller(client=client)
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            self.metrics.unauthenticated()
            raise Unauthenticated("missing API key: send 'Authorization: Bearer KEY'")
        token = token.strip()
        digest = hash_token(token)
        known = self.key_cache.get(digest)
        if known is None:  # one thread hop for both reads; recent callers need none
            try:
                known = await asyncio.to_thread(self._look_up, token)
            except Unauthenticated:
                self.metrics.unauthenticated()
                raise
            self.key_cache.put(digest, known)
        return Caller(client=client, key=known.key, accepted_terms=known.accepted_version)

    def _look_up(self, token: str) -> KnownCaller:
        assert self.keys is not None
        key = self.keys.authenticate(token)
        return KnownCaller(key, self.keys.accepted_version(key.key_id))

    async def check_key(self, authorization: str | None, client: str, model: str | None) -> Caller:
        """``authenticate``, run before the body is read; a failure also costs the address.

        Failed authentications of one address share a bucket of their own
        (``unauthenticated_limits``): while it has room the failure is a 401, then a 429. A
        valid key never touches it.
        """
        try:
            return await self.authenticate(authorization, client)
        except Unauthenticated as failure:
            policy = self._policy(self.settings.unauthenticated_limits)
            decision = await self.limiter.check(f"unauthenticated:{limit_subject(client)}", policy)
            if decision.allowed:
                raise
            self.metrics.rate_limited(model or "", "ip")
            raise RateLimited(
                "too many requests without a valid API key from this client address; retry "
                f"after {max(1, math.ceil(decision.retry_after_s))} s",
                retry_after_s=decision.retry_after_s,
                headers=ratelimit_headers(decision, policy),
            ) from failure

    async def admit(self, caller: Caller, model: str) -> None:
        """The checks on an authenticated caller before its request is decoded: terms (403),
        monitor (403), audit trail accepting (503); raises the first that fails."""
        if caller.key is not None:
            self._require_terms(caller)
            caller.assessment = await self._assessment(caller.key)
            if caller.assessment is not None and caller.assessment.level == "blocked":
                self.metrics.blocked(model)
            self._refuse_if_blocked(caller.key, caller.assessment)
        if self.audit is not None:
            self.audit.check_accepting()

    async def limit(self, caller: Caller, model: str, samples: int) -> None:
        """Charge ``samples`` to the key's and the address's limits (429 when refused); the
        admitted answer's ``RateLimit`` headers go to ``caller.headers``."""
        throttled = caller.assessment is not None and caller.assessment.level == "throttled"
        caller.headers = await self._limit(caller, model, throttled, samples)

    async def accept_terms(self, caller: Caller, version: str) -> None:
        """Record that ``caller`` accepted the current terms."""
        if caller.key is None or self.keys is None:
            raise Unauthenticated("accepting the terms needs an API key")
        if version != self.terms.version:
            raise PermissionDenied(
                f"terms version {version!r} is not current; the current version is "
                f"{self.terms.version!r} (GET /v1/terms)"
            )
        await asyncio.to_thread(
            self.keys.record_acceptance,
            caller.key.key_id,
            self.terms.version,
            self.terms.sha256,
            caller.client,
            time.time(),
        )
        self.key_cache.forget(caller.key.key_id)
        log.info("terms_accepted", key_id=caller.key.key_id, version=version, client=caller.client)

    async def record_served(
        self,
        caller: Caller,
        model: str,
        outcome: InferenceOutcome,
        specs: list[TensorSpec],
        context: RequestContext | None = None,
    ) -> None:
        """After an answer: let the monitor see it, then audit it, waiting for the commit under
        the ``"refuse"`` policy (``Unavailable``: the answer must not be sent). ``context`` is
        marked audited while its record stands, so a client that leaves during the commit is
        not recorded twice."""
        score = None
        if self.monitor is not None and caller.key is not None:
            assessment = await self.monitor.observe(
                caller.key.key_id,
                model,
                outcome.inputs,
                outcome.activations,
                outcome.predicted,
                specs,
            )
            score = assessment.score
            self.metrics.set_risk(caller.key.key_id, assessment.score)
            if self.groups is not None:
                self.groups.note(caller.key.key_id, caller.client)
            phases.mark("monitor_observed")
        self.metrics.observe_front(model, outcome.front_seconds)
        self.metrics.observe_private_call(model, outcome.private_seconds)
        committed = self._audit(
            caller,
            model,
            "served",
            200,
            outcome.inputs,
            _answer(outcome),
            score,
            request_id=outcome.response.id,
            submit=True,
        )
        phases.mark("audit_submitted")
        if context is not None:
            context.audited = True
        if committed is not None:
            await self._committed(committed, context)
            phases.mark("audit_committed")

    async def _committed(self, committed: Future[int], context: RequestContext | None) -> None:
        """Wait for a served record's commit; a failed one leaves the 503 to be recorded."""
        waiter = asyncio.wrap_future(committed)
        waiter.add_done_callback(_retrieved)  # a cancelled request leaves none to read it
        started = time.perf_counter()
        try:
            await asyncio.shield(waiter)
        except Unavailable:
            if context is not None:
                context.audited = False
            raise
        finally:
            self.metrics.observe_audit_commit(time.perf_counter() - started)

    def record_outcome(self, context: RequestContext, status: int) -> None:
        """Audit an inference request that was not served: under its key if it had a valid
        one, else counted with the address's other refusals of this interval.

        If the trail cannot take the record (it is failing), the refusal is logged instead:
        nothing was served, and the client already gets an error.
        """
        decision = context.decision or decision_for_status(status)
        if context.closed is not None:
            decision, status = "closed", 408 if context.closed == "timeout" else 499
        caller = context.caller or Caller(client=context.client)
        if self.audit is None:
            return
        if caller.key is None:
            self.audit.tally(Tallied(caller.client, context.model, decision, status))
            return
        score = None if caller.assessment is None else caller.assessment.score
        try:
            self._audit(
                caller,
                context.model,
                decision,
                status,
                None,
                None,
                score,
                request_id=context.request_id,
            )
        except Unavailable as failure:
            log.warning(
                "audit_record_dropped",
                key_id=caller.key_id,
                client=caller.client,
                model=context.model,
                decision=decision,
                status=status,
                request_id=context.request_id,
                reason=failure.message,
            )

    async def close(self) -> None:
        """Flush the audit trail and close the stores."""
        if self.groups is not None:
            await self.groups.close()
        await self.limiter.close()
        if self.audit is not None:
            await asyncio.to_thread(self.audit.close)

    def _require_terms(self, caller: Caller) -> None:
        if caller.accepted_terms != self.terms.version:
            raise TermsNotAccepted(
                f"API key {caller.key_id} has not accepted the current terms of service "
                f"(version {self.terms.version}): read GET /v1/terms, then POST /v1/terms/accept"
            )

    async def _assessment(self, key: ApiKey) -> Assessment | None:
        return None if self.monitor is None else await self.monitor.current(key.key_id)

    def _refuse_if_blocked(self, key: ApiKey, assessment: Assessment | None) -> None:
        if assessment is not None and assessment.level == "blocked":
            # The reasons stay in the logs and `splitvault monitor show`: telling the client
            # which signal caught it would help it evade the monitor.
            raise KeyBlocked(
                f"API key {key.key_id} is blocked: suspected model extraction; contact the operator"
            )

    def _key_policy(self, key: ApiKey | None, model: str, throttled: bool) -> LimitPolicy:
        base = self.settings.model_limits.get(model, self.settings.key_limits)
        rate = key.rate_per_s if key is not None and key.rate_per_s else base.rate_per_s
        burst = key.burst if key is not None and key.burst else base.burst
        quota = key.daily_quota if key is not None and key.daily_quota else base.daily_quota
        if throttled:
            rate *= self.settings.throttle_factor
            burst = max(1, int(burst * self.settings.throttle_factor))
        return LimitPolicy(rate_per_s=rate, burst=burst, daily_quota=quota)

    @staticmethod
    def _policy(limits: LimitSettings) -> LimitPolicy:
        return LimitPolicy(
            rate_per_s=limits.rate_per_s, burst=limits.burst, daily_quota=limits.daily_quota
        )

    async def _limit(
        self, caller: Caller, model: str, throttled: bool, samples: int
    ) -> dict[str, str]:
        """Per-key and per-address limits, decided together: a refusal consumes neither."""
        key_policy = self._key_policy(caller.key, model, throttled)
        ip_policy = self._policy(self.settings.ip_limits)
        for policy, who, scope in (
            (key_policy, "API key", "key"),
            (ip_policy, "client address", "ip"),
        ):
            if samples > policy.burst:  # never admissible: waiting would not help
                self.metrics.rate_limited(model, scope)
                raise RateLimited(
                    f"a request of {samples} samples exceeds the burst of {policy.burst} "
                    f"samples for this {who} on model {model!r}; send smaller batches",
                    headers={"RateLimit-Policy": policy_header(policy)},
                )
        key_decision, ip_decision = await self.limiter.check_many(
            [
                (f"key:{caller.key_id or ANONYMOUS}:model:{model}", key_policy),
                (f"ip:{limit_subject(caller.client)}:model:{model}", ip_policy),
            ],
            cost=samples,
        )
        headers = ratelimit_headers(key_decision, key_policy)
        for decision, policy, who, scope in (
            (key_decision, key_policy, "API key", "key"),
            (ip_decision, ip_policy, "client address", "ip"),
        ):
            if decision.allowed:
                continue
            quota = decision.limit_name == "daily"
            self.metrics.rate_limited(model, "quota" if quota else scope)
            what = "daily quota" if quota else "rate limit"
            raise (QuotaExceeded if quota else RateLimited)(
                f"{what} exceeded for this {who} on model {model!r}; "
                f"retry after {max(1, math.ceil(decision.retry_after_s))} s",
                retry_after_s=decision.retry_after_s,
                headers=ratelimit_headers(decision, policy),
            )
        return headers

    def _audit(
        self,
        caller: Caller,
        model: str | None,
        decision: str,
        status: int,
        inputs: dict[str, Any] | None,
        answer: str | None,
        score: float | None,
        *,
        request_id: str | None = None,
        submit: bool = False,
    ) -> Future[int] | None:
        """Queue the record; with ``submit`` under the ``"refuse"`` policy, the future of its
        commit."""
        if self.audit is None:
            return None
        record = AuditRecord(
            time=time.time(),
            key_id=caller.key_id,
            client=caller.client,
            model=model,
            input_sha256=None if inputs is None else input_digest(inputs),
            answer=answer,
            decision=decision,
            status=status,
            monitor_score=score,
            request_id=request_id,
        )
        committed = None
        if submit and self.audit.commits_before_response:
            committed = self.audit.submit(record)
        else:
            self.audit.append(record)
        self.metrics.set_audit_pending(self.audit.pending)
        return committed


def _retrieved(waiter: asyncio.Future[int]) -> None:
    """Read a commit's outcome so that a failure nobody awaits is not reported as unhandled."""
    if not waiter.cancelled():
        waiter.exception()


def _answer(outcome: InferenceOutcome) -> str:
    """The answer as returned; embeddings are recorded by digest (they are large)."""
    output = outcome.response.outputs[0]
    if output.datatype == "BYTES":
        return json.dumps(output.data, separators=(",", ":"))
    digest = input_digest({"answer": np.asarray(output.data, dtype=np.float64)})
    return json.dumps({"shape": output.shape, "sha256": digest})
