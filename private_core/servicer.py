"""The gRPC servicer: decode, call the runner, encode; errors mapped through the one table."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from private_core.activation_monitor import ActivationMonitor
from private_core.auth import peer_identities
from private_core.metrics import PrivateMetrics
from private_core.model_store import ModelStore
from private_core.runner import BackStageRunner
from protos import inference_pb2, inference_pb2_grpc
from shared.errors import InternalError, SplitVaultError, mapping_for
from shared.logs import get_logger

log = get_logger(__name__)
Context = grpc.aio.ServicerContext[Any, Any]


class PrivateInferenceServicer(inference_pb2_grpc.PrivateInferenceServicer):
    """Implements ``splitvault.v1.PrivateInference``."""

    def __init__(
        self,
        store: ModelStore,
        runner: BackStageRunner,
        metrics: PrivateMetrics,
        monitor: ActivationMonitor | None = None,
    ) -> None:
        self._store = store
        self._runner = runner
        self._metrics = metrics
        self._monitor = monitor

    async def Infer(
        self, request: inference_pb2.InferRequest, context: Context
    ) -> inference_pb2.InferResponse:
        try:
            # Activation monitor, before batching: refuse or slow a crafted-looking stream.
            if self._monitor is not None:
                verdict = self._monitor.check(request, peer_identities(context))
                if verdict.error is not None:
                    raise verdict.error
                if verdict.delay_s > 0:
                    await asyncio.sleep(verdict.delay_s)
            response = await self._runner.infer(request)
        except SplitVaultError as error:
            await self._abort(context, request.model, error)
        except Exception:
            log.exception("infer_failed", model=request.model, request_id=request.request_id)
            await self._abort(context, request.model, InternalError("internal error"))
        else:
            self._metrics.observe_request(request.model, grpc.StatusCode.OK)
            return response
        raise AssertionError("unreachable: abort raises")

    async def _abort(self, context: Context, model: str, error: SplitVaultError) -> None:
        """Count the call under the error's code (``ERROR_TABLE``) and end it with that code."""
        code = mapping_for(error).grpc_code
        self._metrics.observe_request(model, code)
        await context.abort(code, error.message)

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
                )
                for name in names
            ]
        )
