"""Front stages: load the plaintext programs and run them, off the event loop unless tiny.

Handing a call to a worker thread costs two thread wake-ups and the GIL changing hands, more
than a small convolutional front stage itself. ``FrontRunner.calibrate`` therefore times each
stage once at startup, on one row with every other dynamic dimension at its maximum (the
costliest row a request may carry); a call expected to take less than ``inline_below_s`` (rows
times that cost) runs directly on the event loop, anything else in the pool, so a heavy stage
never blocks the loop. A stage that was not calibrated always runs in the pool.

Calls that go to the pool are batched with concurrent calls of the same model
(``public_api.front_batcher``) once the stage is registered with ``FrontRunner.batch``.

Every call goes through the tier's ``ComputeThreads``: a lone request's front runs on all the
tier's cores, calls under load on ``torch_threads``; an inline call that would overlap a call
with another thread count goes to the pool instead.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
from prometheus_client import CollectorRegistry

from public_api.front_batch_settings import FrontBatchSettings
from public_api.front_batcher import FrontBatcher, front_outputs, transport_arrays
from public_api.settings import PublicSettings
from shared.compute_threads import ComputeThreads
from shared.exported import serving_module
from shared.layout import TierDir
from shared.logs import get_logger
from shared.manifest import (
    BATCH_DIM,
    ModelConfig,
    StageManifest,
    max_message_bytes,
    read_config,
    read_manifest,
)
from shared.tensor_codec import numpy_dtype

log = get_logger(__name__)


@dataclass(frozen=True)
class FrontStage:
    """A loaded front stage with its config and manifest."""

    config: ModelConfig
    manifest: StageManifest
    module: torch.nn.Module


def load_front_stages(tier: TierDir) -> dict[str, FrontStage]:
    """Load every model under ``tier.models``; a broken one is logged and skipped."""
    stages: dict[str, FrontStage] = {}
    folders = sorted(p for p in tier.models.iterdir() if p.is_dir()) if tier.models.is_dir() else []
    for folder in folders:
        try:
            config, manifest = read_config(folder), read_manifest(folder)
            program = torch.export.load(folder / manifest.file)
        except Exception as error:  # one bad model must not stop the others
            log.error(
                "front_stage_load_failed",
                model=folder.name,
                error=type(error).__name__,
                detail=str(error)[:200],
            )
            continue
        stages[config.name] = FrontStage(config, manifest, serving_module(program))
        log.info("front_stage_loaded", model=config.name)
    return stages


class FrontRunner:
    """Runs front stages and casts activations to the transport datatype."""

    def __init__(
        self,
        executor: ThreadPoolExecutor,
        inline_below_s: float = 0.0,
        threads: ComputeThreads | None = None,
        batching: FrontBatchSettings | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        """``batching``: how stages registered with ``batch`` are batched (default settings);
        ``registry``: where the batcher's metrics go."""
        self._executor = executor
        self._inline_below_s = inline_below_s
        self._threads = threads or ComputeThreads(1, 1)
        self._seconds_per_row: dict[str, float] = {}
        self._batcher = FrontBatcher(
            executor, batching or FrontBatchSettings(), self._threads, registry
        )

    def batch(self, stage: FrontStage) -> None:
        """Batch ``stage``'s calls that run in the pool with concurrent ones of its model."""
        self._batcher.register(stage)

    async def close(self) -> None:
        """Let running batches finish; refuse queued calls."""
        await self._batcher.close()

    def calibrate(self, stage: FrontStage, repeats: int = 5) -> float:
        """Time ``stage`` on its costliest single row (best of ``repeats``); returns seconds."""
        inputs = probe_inputs(stage.manifest)
        run_front(stage, inputs)  # warm-up: first calls build caches
        best = math.inf
        for _ in range(repeats):
            started = time.perf_counter()
            run_front(stage, inputs)
            best = min(best, time.perf_counter() - started)
        self._seconds_per_row[stage.config.name] = best
        log.info(
            "front_stage_timed",
            model=stage.config.name,
            ms_per_row=round(best * 1000, 3),
            inline=best < self._inline_below_s,
        )
        return best

    async def run(
        self, stage: FrontStage, inputs: dict[str, Any], rows: int, *, lone: bool = False
    ) -> dict[str, Any]:
        """Front-stage activations by output name, as NumPy arrays ready to send (``lone``:
        no other request is in flight in this tier, so the call may use every core)."""
        per_row = self._seconds_per_row.get(stage.config.name)
        if per_row is not None and per_row * max(rows, 1) < self._inline_below_s:
            ran, result = self._threads.try_run(partial(run_front, stage, inputs))
            if ran and result is not None:
                return result
        if self._batcher.serves(stage.config.name):
            return await self._batcher.run(stage, inputs, rows, lone=lone)
        loop = asyncio.get_running_loop()
        front = partial(run_front, stage, inputs)
        call = partial(self._threads.run, lone, front, key=stage.config.name, rows=rows)
        return await loop.run_in_executor(self._executor, call)

    def seconds_per_row(self, model: str) -> float | None:
        """``model``'s calibrated seconds per row (``None``: not calibrated)."""
        return self._seconds_per_row.get(model)


def probe_inputs(manifest: StageManifest) -> dict[str, Any]:
    """One row of valid inputs with every other dynamic dimension at its maximum."""
    inputs: dict[str, Any] = {}
    for spec in manifest.inputs:
        shape = [
            dim if isinstance(dim, int) else 1 if dim.name == BATCH_DIM else dim.max
            for dim in spec.shape
        ]
        dtype = numpy_dtype(spec.datatype)
        if dtype.kind == "f":
            inputs[spec.name] = np.zeros(shape, dtype)
        else:
            low, high = spec.value_range or (1, 1)
            inputs[spec.name] = np.full(shape, min(max(1, low), high), dtype)
    return inputs


def message_limit(settings: PublicSettings, stages: Mapping[str, FrontStage]) -> int:
    """The gRPC send limit: the configured one, raised to fit the largest request a stage allows."""
    limit = settings.max_message_mb * 1024 * 1024
    for stage in stages.values():
        by_name = {spec.name: spec for spec in stage.manifest.inputs}
        specs = [*stage.manifest.outputs, *(by_name[n] for n in stage.manifest.forward_inputs)]
        limit = max(limit, max_message_bytes(specs, stage.config))
    log.info("grpc_message_limit", limit_bytes=limit)
    return limit


def run_front(stage: FrontStage, inputs: dict[str, Any]) -> dict[str, Any]:
    """One request's front-stage activations, unbatched."""
    args = [torch.from_numpy(inputs[spec.name]) for spec in stage.manifest.inputs]
    outputs = front_outputs(stage, args)
    return transport_arrays(stage.config, stage.manifest.outputs, outputs)
