"""The gate between a request and the model: API key, terms, monitor, limits, audit, metrics.

Order for an inference request: authenticate (401) -> current terms accepted (403) -> key not
blocked by the extraction monitor (403) -> the audit trail can take a record (503) -> per-key
and per-address limits and quotas (429) -> inference -> the monitor observes the answer -> one
audit record. A rejected request is audited too and computes nothing. An answer whose record the
trail refuses is not sent (503); a refusal the trail cannot take is logged instead.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from public_api.addresses import limit_subject
from public_api.audit import AuditRecord, AuditTrail, input_digest
from public_api.key_cache import KeyCache, KnownCaller
from public_api.keys import ApiKey, KeyStore, hash_token
from public_api.metrics import PublicMetrics
from public_api.monitor import Assessment, ExtractionMonitor
from public_api.protection_settings import LimitSettings, ProtectionSettings
from public_api.ratelimit import LimitPolicy, RateLimiter, ratelimit_headers
from public_api.service import InferenceOutcome
from public_api.terms import Terms
from shared.errors import (
    KeyBlocked,
    PermissionDenied,
    QuotaExceeded,
    RateLimited,
    SplitVaultError,
    TermsNotAccepted,
    Unauthenticated,
    Unavailable,
    mapping_for,
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
    ) -> None:
        self.settings = settings
        self.keys = keys
        self.key_cache = key_cache or KeyCache()
        self.terms = terms
        self.limiter = limiter
        self.monitor = monitor
        self.audit = audit
        self.metrics = metrics

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

    async def admit(self, authorization: str | None, client: str, model: str) -> Caller:
        """All checks that come before any compute; audits and raises the first that fails.

        A refusal after authentication is audited under the caller's key id, so that
        ``audit export --key`` shows the key's refused requests too.
        """
        caller = Caller(client=client)
        try:
            caller = await self.authenticate(authorization, client)
            if caller.key is not None:
                self._require_terms(caller)
                caller.assessment = await self._assessment(caller.key)
                self._refuse_if_blocked(caller.key, caller.assessment)
            if self.audit is not None:
                self.audit.check_accepting()
            throttled = caller.assessment is not None and caller.assessment.level == "throttled"
            caller.headers = await self._limit(caller, model, throttled)
        except SplitVaultError as error:
            self.record_rejection(caller, client, model, error)
            raise
        return caller

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
        self, caller: Caller, model: str, outcome: InferenceOutcome, specs: list[TensorSpec]
    ) -> None:
        """After an answer: let the monitor see it, then audit it."""
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
        self.metrics.observe_front(model, outcome.front_seconds)
        self.metrics.observe_private_call(model, outcome.private_seconds)
        self._audit(
            caller,
            model,
            "served",
            200,
            outcome.inputs,
            _answer(outcome),
            score,
            request_id=outcome.response.id,
        )

    def record_rejection(
        self,
        caller: Caller | None,
        client: str,
        model: str | None,
        error: SplitVaultError,
        request_id: str | None = None,
    ) -> None:
        """Audit a refused request (the gate's refusals and errors after admission).

        If the trail cannot take the record (it is failing), the refusal is logged instead:
        nothing was served, and the client already gets an error.
        """
        status = mapping_for(error).http_status
        decision = _decision(error)
        if isinstance(error, KeyBlocked) and model is not None:
            self.metrics.blocked(model)
        caller = caller or Caller(client=client)
        score = None if caller.assessment is None else caller.assessment.score
        try:
            self._audit(caller, model, decision, status, None, None, score, request_id=request_id)
        except Unavailable as failure:
            log.warning(
                "audit_record_dropped",
                key_id=caller.key_id,
                client=caller.client,
                model=model,
                decision=decision,
                status=status,
                request_id=request_id,
                reason=failure.message,
            )

    async def close(self) -> None:
        """Flush the audit trail and close the stores."""
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

    async def _limit(self, caller: Caller, model: str, throttled: bool) -> dict[str, str]:
        """Per-key and per-address limits, decided together: a refusal consumes neither."""
        key_policy = self._key_policy(caller.key, model, throttled)
        ip_policy = self._policy(self.settings.ip_limits)
        key_decision, ip_decision = await self.limiter.check_many(
            [
                (f"key:{caller.key_id or ANONYMOUS}:model:{model}", key_policy),
                (f"ip:{limit_subject(caller.client)}:model:{model}", ip_policy),
            ]
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
    ) -> None:
        if self.audit is None:
            return
        self.audit.append(
            AuditRecord(
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
        )
        self.metrics.set_audit_pending(self.audit.pending)


def _decision(error: SplitVaultError) -> str:
    table: list[tuple[type[SplitVaultError], str]] = [
        (Unauthenticated, "unauthenticated"),
        (TermsNotAccepted, "terms_required"),
        (KeyBlocked, "blocked"),
        (PermissionDenied, "forbidden"),
        (QuotaExceeded, "quota_exceeded"),
        (RateLimited, "rate_limited"),
    ]
    for cls, name in table:
        if isinstance(error, cls):
            return name
    status = mapping_for(error).http_status
    return "bad_request" if status < 500 else "unavailable" if status == 503 else "error"


def _answer(outcome: InferenceOutcome) -> str:
    """The answer as returned; embeddings are recorded by digest (they are large)."""
    output = outcome.response.outputs[0]
    if output.datatype == "BYTES":
        return json.dumps(output.data, separators=(",", ":"))
    digest = input_digest({"answer": np.asarray(output.data, dtype=np.float64)})
    return json.dumps({"shape": output.shape, "sha256": digest})
