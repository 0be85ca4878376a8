"""Anchor the audit trail in the private tier's ledger: every N records or S seconds.

After each commit the trail tells the anchorer its head; once ``every_records`` records wait
unanchored, or ``every_s`` seconds after the last anchor while any wait, the anchorer sends
(chain id, seq, head) to ``PrivateLedger.AnchorAudit`` and keeps the signed receipt beside the
records (``public_api.audit_receipts``). After the anchor covering record n exists, no change to
records 1..n passes ``splitvault audit verify --anchors``.

When an anchor cannot be obtained (private tier unreachable, its ledger refusing, a conflict),
records keep being written and wait unanchored (``audit_anchor_failed``, retried every
``retry_s``), up to ``max_unanchored_records`` records or ``max_unanchored_s`` seconds for the
oldest. Beyond that, new inference requests are refused with 503 and Retry-After
(``audit_anchoring_refusing``) until an anchor succeeds again (``audit_anchoring_recovered``).
Metrics: ``splitvault_audit_unanchored_records``, ``splitvault_audit_anchored_seq``,
``splitvault_audit_anchor_refusing``, ``splitvault_audit_anchor_failures_total``.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge

from protos import inference_pb2
from public_api.anchor_settings import AnchorSettings
from public_api.audit_receipts import ReceiptStore, SqliteReceipts
from public_api.audit_writer import AuditTrail
from shared.anchor_receipt import AnchorReceipt
from shared.errors import InternalError, SplitVaultError, Unavailable
from shared.logs import get_logger

AnchorCall = Callable[[inference_pb2.AnchorRequest], Awaitable[inference_pb2.AnchorReceipt]]
log = get_logger(__name__)


class AuditAnchorer:
    """Keeps one audit trail anchored; build with ``start`` (it needs the running loop)."""

    def __init__(
        self,
        trail: AuditTrail,
        receipts: ReceiptStore,
        call: AnchorCall,
        settings: AnchorSettings,
        registry: CollectorRegistry,
    ) -> None:
        self._trail = trail
        self._receipts = receipts
        self._call = call
        self._settings = settings
        self._lock = threading.Lock()
        self._wake = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._anchored = receipts.last_anchored(trail.chain_id)
        self._since: float | None = None  # monotonic time the oldest unanchored record came
        if trail.committed_head[0] > self._anchored:
            self._since = time.monotonic()
        self._failing: str | None = None
        self._refusing = False
        self._task: asyncio.Task[None] | None = None
        self._failures = Counter(
            "splitvault_audit_anchor_failures_total",
            "Audit anchors the private tier did not give.",
            registry=registry,
        )
        for name, text, value in (
            ("unanchored_records", "Audit records not yet anchored.", self.unanchored),
            ("anchored_seq", "The last audit record anchored.", lambda: self._anchored),
            ("anchor_refusing", "1 while requests are refused, unanchored.", self._refusing_now),
        ):
            Gauge(f"splitvault_audit_{name}", text, registry=registry).set_function(value)

    @classmethod
    def start(
        cls,
        trail: AuditTrail,
        receipts: ReceiptStore,
        call: AnchorCall,
        settings: AnchorSettings,
        registry: CollectorRegistry,
    ) -> AuditAnchorer:
        """Start anchoring ``trail`` through ``call``, keeping receipts in ``receipts``."""
        anchorer = cls(trail, receipts, call, settings, registry)
        trail.add_commit_listener(anchorer._committed)
        trail.add_admission_gate(anchorer.refusal)
        anchorer._task = asyncio.create_task(anchorer._run(), name="audit-anchorer")
        log.info("audit_anchoring_started", chain_id=trail.chain_id, anchored=anchorer._anchored)
        return anchorer

    def unanchored(self) -> int:
        """Records appended (written or queued) that no anchor covers yet."""
        return self._trail.committed_head[0] + self._trail.pending - self._anchored

    def refusal(self) -> Unavailable | None:
        """Why a new request is refused now (too much of the trail unanchored), or ``None``."""
        waiting, age = self.unanchored(), self._age()
        limits = self._settings
        if waiting < limits.max_unanchored_records and age < limits.max_unanchored_s:
            if self._refusing:
                self._refusing = False
                log.warning("audit_anchoring_admitting", unanchored=waiting)
            return None
        if not self._refusing:
            self._refusing = True
            log.error(
                "audit_anchoring_refusing",
                unanchored=waiting,
                oldest_s=round(age, 1),
                reason=self._failing,
            )
        return Unavailable(
            f"the audit trail cannot be anchored: {waiting} records wait for the private "
            "tier's ledger",
            retry_after_s=max(self._settings.retry_s, 1.0),
        )

    async def close(self) -> None:
        """Stop, after one last anchor of what the trail holds (if it can be had)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._trail.committed_head[0] > self._anchored:
            await self._anchor_once()

    def _committed(self, seq: int, _head: str) -> None:
        """Called by the writer thread after each commit."""
        with self._lock:
            if self._since is None and seq > self._anchored:
                self._since = time.monotonic()
            due = seq - self._anchored >= self._settings.every_records
        if due:
            self._loop.call_soon_threadsafe(self._wake.set)

    def _age(self) -> float:
        since = self._since
        return 0.0 if since is None else time.monotonic() - since

    def _refusing_now(self) -> float:
        return 1.0 if self._refusing else 0.0

    async def _run(self) -> None:
        while True:
            delay = self._settings.retry_s if self._failing else self._settings.every_s
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=delay)
            self._wake.clear()
            if self._trail.committed_head[0] > self._anchored:
                await self._anchor_once()

    async def _anchor_once(self) -> None:
        seq, head = self._trail.committed_head
        chain_id = self._trail.chain_id
        request = inference_pb2.AnchorRequest(
            chain_id=chain_id, seq=seq, head=head, record_count=seq
        )
        try:
            reply = await asyncio.wait_for(self._call(request), self._settings.timeout_s)
            receipt = AnchorReceipt.from_proto(reply)
            if (receipt.chain_id, receipt.seq, receipt.head) != (chain_id, seq, head):
                raise InternalError("the private tier's receipt is for another anchor")
            await asyncio.to_thread(self._receipts.store, receipt)
        except (SplitVaultError, sqlite3.Error, TimeoutError) as error:
            self._failed(getattr(error, "message", None) or f"{type(error).__name__}: {error}")
            return
        self._succeeded(receipt)

    def _succeeded(self, receipt: AnchorReceipt) -> None:
        with self._lock:
            self._anchored = max(self._anchored, receipt.seq)
            later = self._trail.committed_head[0] > self._anchored
            self._since = time.monotonic() if later else None
        recovered, self._failing = self._failing, None
        if recovered is not None:
            log.warning("audit_anchoring_recovered", after=recovered, seq=receipt.seq)
        log.info(
            "audit_anchored",
            chain_id=receipt.chain_id,
            seq=receipt.seq,
            replica_id=receipt.replica_id,
            signer=receipt.signer,
        )

    def _failed(self, reason: str) -> None:
        self._failures.inc()
        if reason != self._failing:
            log.error("audit_anchor_failed", reason=reason, unanchored=self.unanchored())
        self._failing = reason


def start_anchoring(
    trail: AuditTrail | None,
    receipts: Path | ReceiptStore,
    call: AnchorCall,
    settings: AnchorSettings,
    registry: CollectorRegistry,
) -> AuditAnchorer | None:
    """The anchorer of ``trail``, started; ``None`` without a trail or with anchoring off."""
    if trail is None or not settings.enabled:
        return None
    store = SqliteReceipts(receipts) if isinstance(receipts, Path) else receipts
    return AuditAnchorer.start(trail, store, call, settings, registry)
