"""Run back stages: decode and check the activations, compute off the event loop, restrict."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from private_core.metrics import PrivateMetrics
from private_core.model_store import BackStage, ModelStore
from private_core.policy import restrict
from protos import inference_pb2
from shared.errors import InvalidInput
from shared.tensor_codec import from_proto, numpy_dtype, to_proto
from shared.validation import check_tensors


class BackStageRunner:
    """Answers ``InferRequest`` messages with policy-restricted outputs."""

    def __init__(
        self, store: ModelStore, executor: ThreadPoolExecutor, metrics: PrivateMetrics
    ) -> None:
        self._store = store
        self._executor = executor
        self._metrics = metrics

    async def infer(self, request: inference_pb2.InferRequest) -> inference_pb2.InferResponse:
        """Check, run and restrict one request."""
        stage = self._store.get(request.model)
        arrays = _decode(request)
        sizes = check_tensors(stage.manifest.inputs, arrays, float_transport=True)
        batch = sizes.get("batch", 0)
        if batch > stage.config.max_batch_size:
            raise InvalidInput(
                f"batch {batch} exceeds this model's limit {stage.config.max_batch_size}"
            )
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        outputs = await loop.run_in_executor(
            self._executor, _run_back_stage, stage, arrays, int(request.top_k)
        )
        self._metrics.observe_back_stage(request.model, time.perf_counter() - started)
        self._metrics.observe_batch(request.model, batch)
        return inference_pb2.InferResponse(
            model=request.model,
            outputs=[to_proto(name, value) for name, value in outputs.items()],
            policy=stage.config.policy.kind,
        )


def _decode(request: inference_pb2.InferRequest) -> dict[str, Any]:
    arrays: dict[str, Any] = {}
    for tensor in request.inputs:
        if tensor.name in arrays:
            raise InvalidInput(f"input {tensor.name!r} was sent twice")
        arrays[tensor.name] = from_proto(tensor)
    return arrays


def _run_back_stage(stage: BackStage, arrays: dict[str, Any], top_k: int) -> dict[str, Any]:
    args = []
    for spec in stage.manifest.inputs:
        array = arrays[spec.name].astype(numpy_dtype(spec.datatype), copy=False)
        if not array.flags.writeable:  # a view of the request bytes; torch wants its own
            array = array.copy()
        args.append(torch.from_numpy(array))
    with torch.inference_mode():
        output = stage.module(*args)
    return restrict(stage, output, arrays, top_k)
