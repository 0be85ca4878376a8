"""The ``splitvault.v1.PrivateLedger`` gRPC service: decode, call the anchor book, encode.

The identity interceptor already admits only ``allowed_identities``; this service also checks
the caller against ``anchor_identities`` and records who anchored in each receipt. The ledger's
state is reported three ways: the health service ``splitvault.v1.PrivateLedger`` (NOT_SERVING
while the ledger refuses records), the gauge ``splitvault_ledger_ok`` and the logs.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2
from prometheus_client import CollectorRegistry, Counter, Gauge

from private_core.anchors import AnchorBook
from private_core.auth import IdentityRule, peer_identities
from private_core.ledger import Ledger, LedgerUnavailable
from protos import inference_pb2, inference_pb2_grpc
from shared.crypto import DecryptionError
from shared.errors import (
    AnchorConflict,
    InternalError,
    PermissionDenied,
    SplitVaultError,
    mapping_for,
)
from shared.keys import KeyProvider
from shared.logs import get_logger

LEDGER_SERVICE = "splitvault.v1.PrivateLedger"
log = get_logger(__name__)
Context = grpc.aio.ServicerContext[Any, Any]


@dataclass
class LedgerService:
    """This replica's ledger, its anchor book (``None`` while the ledger refuses records)."""

    ledger: Ledger
    book: AnchorBook | None

    @property
    def recording(self) -> bool:
        """Whether anchors can be recorded now."""
        return self.ledger.ok and self.book is not None

    @property
    def health_status(self) -> Any:
        """SERVING when anchors can be recorded, else NOT_SERVING."""
        if self.recording:
            return health_pb2.HealthCheckResponse.SERVING
        return health_pb2.HealthCheckResponse.NOT_SERVING

    def close(self) -> None:
        """Release the ledger's segment."""
        self.ledger.close()

    async def keep_health(self, health: Any, interval_s: float = 1.0) -> None:
        """Keep ``health``'s status of the ledger service true while the tier runs: a ledger
        that starts refusing records (a failed write that could not be undone) is reported
        NOT_SERVING within ``interval_s``, not only at start."""
        reported = self.health_status
        await health.set(LEDGER_SERVICE, reported)  # idempotent: start reports it too
        while True:
            await asyncio.sleep(interval_s)
            status = self.health_status
            if status != reported:
                log.error("ledger_not_serving", problem=self.ledger.problem)
                await health.set(LEDGER_SERVICE, status)
                reported = status


def add_ledger_service(
    server: grpc.aio.Server,
    state_dir: Path,
    replica_id: str | None,
    identities: IdentityRule | Collection[str],
    registry: CollectorRegistry,
    provider: KeyProvider,
) -> LedgerService:
    """Open this replica's ledger (``replica_id``, default the host name) and serve it; its
    signing key is encrypted under ``provider``'s KEK."""
    ledger = Ledger.open(state_dir, replica_id or socket.gethostname())
    book = None
    if ledger.ok:
        try:
            book = AnchorBook.open(ledger, provider)
        except LedgerUnavailable as error:
            log.error("ledger_unavailable", reason=error.message)
        except DecryptionError as error:
            log.error("ledger_unavailable", reason=f"signing key: {error}")
    outcomes = Counter(
        "splitvault_audit_anchors_total",
        "Audit anchor requests, by outcome (recorded, conflict, refused).",
        ["outcome"],
        registry=registry,
    )
    service = LedgerService(ledger, book)
    ok = Gauge("splitvault_ledger_ok", "1 while the private ledger records.", registry=registry)
    ok.set_function(lambda: 1.0 if service.recording else 0.0)
    servicer = PrivateLedgerServicer(ledger, book, IdentityRule.of(identities), outcomes)
    inference_pb2_grpc.add_PrivateLedgerServicer_to_server(servicer, server)
    return service


class PrivateLedgerServicer(inference_pb2_grpc.PrivateLedgerServicer):
    """Implements ``splitvault.v1.PrivateLedger``."""

    def __init__(
        self,
        ledger: Ledger,
        book: AnchorBook | None,
        identities: IdentityRule,
        outcomes: Counter,
    ) -> None:
        self._ledger = ledger
        self._book = book
        self._identities = identities
        self._outcomes = outcomes

    async def AnchorAudit(
        self, request: inference_pb2.AnchorRequest, context: Context
    ) -> inference_pb2.AnchorReceipt:
        try:
            identity = self._identity(context)
            if self._book is None:
                raise LedgerUnavailable(
                    f"the private ledger refuses records: {self._ledger.problem}"
                )
            receipt = await asyncio.to_thread(
                self._book.anchor,
                request.chain_id,
                request.seq,
                request.head,
                request.record_count,
                identity,
            )
        except SplitVaultError as error:
            await self._abort(context, error)
        except Exception:
            log.exception("audit_anchor_failed", chain_id=request.chain_id, seq=request.seq)
            await self._abort(context, InternalError("internal error"))
        else:
            self._outcomes.labels("recorded").inc()
            return receipt.to_proto()
        raise AssertionError("unreachable: abort raises")

    def _identity(self, context: Context) -> str:
        identity = self._identities.match(peer_identities(context))
        if identity is None:
            log.warning("audit_anchor_identity_refused", identities=peer_identities(context))
            raise PermissionDenied("this identity may not anchor the audit trail")
        return identity

    async def _abort(self, context: Context, error: SplitVaultError) -> None:
        outcome = "conflict" if isinstance(error, AnchorConflict) else "refused"
        self._outcomes.labels(outcome).inc()
        await context.abort(mapping_for(error).grpc_code, error.message)
