"""The gRPC servicer: decode, call the runner, encode; errors mapped through the one table."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc

from private_core.admission import Caller
from private_core.auth import IdentityRule, peer_identities
from private_core.metrics import PrivateMetrics
from private_core.model_store import ModelStore
from private_core.runner import BackStageRunner
from protos import inference_pb2, inference_pb2_grpc
from shared import phases
from shared.batch_rpc import FRAMING_BYTES, MAX_BATCH_BYTES, MAX_REQUESTS, failed, runs
from shared.errors import (
    InternalError,
    InvalidInput,
    PayloadTooLarge,
    PermissionDenied,
    SplitVaultError,
    grpc_trailers,
    mapping_for,
)
from shared.logs import get_logger

log = get_logger(__name__)
ANSWER_TOO_LARGE = "the answer exceeds the private tier's message limit"
Context = grpc.aio.ServicerContext[Any, Any]


class PrivateInferenceServicer(inference_pb2_grpc.PrivateInferenceServicer):
    """Implements ``splitvault.v1.PrivateInference``."""

    def __init__(
        self,
        store: ModelStore,
        runner: BackStageRunner,
        metrics: PrivateMetrics,
        identities: IdentityRule | None = None,
        max_reply_bytes: int = 4 * 1024 * 1024,
    ) -> None:
        """``identities``: the rule the interceptor admitted callers by; it names the identity
        each call is counted against (None: calls are not counted). ``max_reply_bytes``: the
        largest message the server may send (an ``InferBatch`` reply is split to fit)."""
        self._max_reply_bytes = max_reply_bytes
        self._store = store
        self._runner = runner
        self._metrics = metrics
        self._identities = identities

    async def Infer(
        self, request: inference_pb2.InferRequest, context: Context
    ) -> inference_pb2.InferResponse:
        phases.flush("request_phases", tier="private")  # the previous call's, once answered
        try:
            response = await self._answer(request, context, peer_identities(context))
        except SplitVaultError as error:
            await self._abort(context, request.model, error)
        else:
            return response
        raise AssertionError("unreachable: abort raises")

    async def InferBatch(
        self, request: inference_pb2.InferBatchRequest, context: Context
    ) -> AsyncIterator[inference_pb2.InferBatchReply]:
        """Answer each request as ``Infer`` would, streaming the results as they are ready (all
        those a moment finished in one reply); a request's failure is its own result."""
        phases.flush("request_phases", tier="private")
        calls = request.requests
        self._metrics.observe_batch_call(len(calls))
        if len(calls) > MAX_REQUESTS:
            error = InvalidInput(f"{len(calls)} requests in one batch call; at most {MAX_REQUESTS}")
            await self._abort(context, "", error)
        identities = peer_identities(context)
        limit = min(self._max_reply_bytes, MAX_BATCH_BYTES)
        pending = {
            asyncio.ensure_future(self._result(index, call, context, identities))
            for index, call in enumerate(calls)
        }
        try:
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                await asyncio.sleep(0)  # neighbours resolved by the same batch finish too
                done |= {task for task in pending if task.done()}
                pending -= done
                results = sorted((task.result() for task in done), key=lambda r: r.index)
                sizes = [result.ByteSize() for result in results]
                for i, size in enumerate(sizes):
                    if size + FRAMING_BYTES > self._max_reply_bytes:  # fails alone, not the call
                        results[i] = failed(results[i].index, PayloadTooLarge(ANSWER_TOO_LARGE))
                        sizes[i] = results[i].ByteSize()
                for start, stop in runs(sizes, limit, len(results)):
                    yield inference_pb2.InferBatchReply(results=results[start:stop])
        finally:  # the call ended early (cancelled, deadline): so do its requests
            for task in pending:
                task.cancel()

    async def _result(
        self,
        index: int,
        request: inference_pb2.InferRequest,
        context: Context,
        identities: Sequence[str],
    ) -> inference_pb2.InferResult:
        try:
            response = await self._answer(request, context, identities)
        except SplitVaultError as error:
            self._metrics.observe_request(request.model, mapping_for(error).grpc_code)
            return failed(index, error)
        return inference_pb2.InferResult(index=index, response=response)

    async def _answer(
        self, request: inference_pb2.InferRequest, context: Context, identities: Sequence[str]
    ) -> inference_pb2.InferResponse:
        """One request checked, counted and answered; any failure as a ``SplitVaultError``."""
        phases.mark("private_in")
        try:
            self._store.check_pairing(request.model, request.pairing_id)
            response = await self._runner.infer(request, self._caller(request, context), identities)
            phases.mark("private_out")
        except SplitVaultError:
            raise
        except Exception:
            log.exception("infer_failed", model=request.model, request_id=request.request_id)
            raise InternalError("internal error") from None
        self._metrics.observe_request(request.model, grpc.StatusCode.OK)
        return response

    def _caller(self, request: inference_pb2.InferRequest, context: Context) -> Caller | None:
        """Who this call counts against: the admitted certificate identity and the key id the
        public tier asserts; ``signed`` is set once the request's signature verifies."""
        if self._identities is None:
            return None
        identity = self._identities.match(peer_identities(context))
        if identity is None:  # the interceptor admitted it; fail closed all the same
            raise PermissionDenied("client identity not allowed")
        return Caller(identity=identity, key_id=request.key_id)

    async def _abort(self, context: Context, model: str, error: SplitVaultError) -> None:
        """Count the call under the error's code (``ERROR_TABLE``) and end it with that code
        (and the error's reason, where the table gives one)."""
        mapping = mapping_for(error)
        code = mapping.grpc_code
        self._metrics.observe_request(model, code)
        await context.abort(code, error.message, grpc_trailers(error))

    async def ModelStatus(
        self, request: inference_pb2.ModelStatusRequest, context: Context
    ) -> inference_pb2.ModelStatusResponse:
        statuses = self._store.status()
        names = [request.model] if request.model else sorted(statuses)
        return inference_pb2.ModelStatusResponse(
            models=[
                inference_pb2.ModelStatus(
                    name=name,
                    ready=name in statuses and statuses[name] is None,
                    reason=statuses.get(name) or ("" if name in statuses else "not deployed"),
                    pairing_id=self._store.pairing_id(name),
                )
                for name in names
            ]
        )
