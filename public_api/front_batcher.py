"""Batching of front stages: concurrent requests for one model run the front as one call.

The scheduling is the private tier's (``shared.batcher``: per-model bounded queues, a request
that finds its model idle starts at once, others wait at most the queue delay); which requests
share a batch, and how they are padded and cut apart, is ``shared.batch_plan``. MiniLM's
requests of different lengths share a batch: token ids and attention masks are zero-padded to
the longest, and each request gets its own positions back (masked padding leaves them as they
would be alone, checked per model at startup). A batch that fails runs its requests one by
one, so one bad request fails alone. Each batch goes through the tier's ``ComputeThreads``: a
batch of one whose caller saw no other request in the tier may use every core.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from prometheus_client import CollectorRegistry, Histogram

from public_api.front_batch_settings import FrontBatchSettings
from public_api.metrics import LATENCY_BUCKETS
from shared.batch_plan import BatchPlan, assemble, plan_batching, unpad
from shared.batcher import BatchSettings, DynamicBatcher
from shared.compute_threads import ComputeThreads
from shared.logs import get_logger
from shared.manifest import BATCH_DIM, DimSpec, ModelConfig, TensorSpec
from shared.tensor_codec import numpy_dtype

if TYPE_CHECKING:
    from public_api.front import FrontStage

log = get_logger(__name__)
Activations = dict[str, Any]  # a request's front-stage outputs by name, ready to send
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


@dataclass(frozen=True)
class FrontJob:
    """One request's front-stage inputs, their named dim sizes, its rows, and whether its
    caller saw no other request in the tier."""

    inputs: Mapping[str, Any]
    sizes: Mapping[str, int]
    rows: int
    lone: bool = False


class FrontBatcher:
    """Front stages served through one dynamic batcher, a lane per model."""

    def __init__(
        self,
        executor: Executor,
        settings: FrontBatchSettings,
        threads: ComputeThreads,
        registry: CollectorRegistry | None = None,
    ) -> None:
        """``registry``: where the batch sizes and queue waits are exported, if anywhere."""
        self._settings = settings
        self._plans: dict[str, BatchPlan] = {}
        self._registry = registry or CollectorRegistry()
        self._rows = Histogram(
            "splitvault_front_batch_size",
            "Rows per front-stage batch.",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=self._registry,
        )
        self._waits = Histogram(
            "splitvault_front_queue_wait_seconds",
            "Time a request waited for its front-stage batch to start, seconds.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self._registry,
        )
        batch = BatchSettings(
            max_batch_size=settings.max_batch_size,
            max_queue_delay_s=settings.max_queue_delay_us / 1e6,
            max_queue_size=settings.max_queue_size,
            concurrent_batches=settings.concurrent_batches,
        )
        self._batcher: DynamicBatcher[FrontJob, Activations] = DynamicBatcher(
            executor,
            batch,
            lambda model, rows, _: self._rows.labels(model).observe(rows),
            threads,
            lambda model, seconds: self._waits.labels(model).observe(seconds),
            tier="public",
            lone=_callers_alone,
        )

    def register(self, stage: FrontStage) -> BatchPlan:
        """Batch ``stage``'s calls from now on; returns how its requests share batches."""
        name = stage.config.name
        plan = plan_batching(
            stage.manifest, partial(front_outputs, stage), name=name, pad=self._settings.pad_batches
        )
        limits = self._settings.models.get(name)
        delay_us = None if limits is None else limits.max_queue_delay_us
        rows = self._batcher.register(
            name,
            partial(run_front_batch, stage, plan),
            stage.config.max_batch_size,
            max_batch_size=None if limits is None else limits.max_batch_size,
            max_queue_delay_s=None if delay_us is None else delay_us / 1e6,
        )
        self._plans[name] = plan
        log.info(
            "front_batching_planned",
            model=name,
            max_rows=rows if plan.batchable else 1,
            padded=sorted(plan.padded),
        )
        return plan

    def serves(self, model: str) -> bool:
        """Whether ``model``'s calls are batched here."""
        return model in self._plans

    async def run(
        self, stage: FrontStage, inputs: Mapping[str, Any], rows: int, *, lone: bool
    ) -> Activations:
        """``inputs``' activations, computed in a batch with concurrent requests of the model."""
        specs = stage.manifest.inputs
        job = FrontJob(inputs, dim_sizes(specs, inputs), rows, lone)
        key = self._plans[stage.config.name].key(specs, inputs)
        return await self._batcher.submit(stage.config.name, job, key=key, rows=rows)

    def queued_rows(self, model: str) -> int:
        """Rows of ``model`` waiting for a batch (for tests and metrics)."""
        return self._batcher.queued_rows(model)

    async def close(self) -> None:
        """Let running batches finish; refuse what is still queued; stop exporting metrics."""
        await self._batcher.close()
        for metric in (self._rows, self._waits):
            self._registry.unregister(metric)


def run_front_batch(
    stage: FrontStage, plan: BatchPlan, jobs: list[FrontJob]
) -> list[Activations | Exception]:
    """One front call for all ``jobs`` (in a worker thread), then each one's own rows; when a
    batch of several fails, each runs alone so one bad request fails alone."""
    try:
        outputs = front_outputs(stage, assemble(stage.manifest, [job.inputs for job in jobs]))
    except Exception:
        if len(jobs) == 1:
            raise
        return [_alone(stage, plan, job) for job in jobs]
    results: list[Activations | Exception] = []
    start = 0
    for job in jobs:
        own = [
            unpad(
                tensor if len(jobs) == 1 else tensor[start : start + job.rows],
                spec,
                plan,
                job.sizes,
            )
            for spec, tensor in zip(stage.manifest.outputs, outputs, strict=True)
        ]
        results.append(transport_arrays(stage.config, stage.manifest.outputs, own))
        start += job.rows
    return results


def _alone(stage: FrontStage, plan: BatchPlan, job: FrontJob) -> Activations | Exception:
    try:
        return run_front_batch(stage, plan, [job])[0]
    except Exception as error:
        return error


def front_outputs(stage: FrontStage, args: list[torch.Tensor]) -> Sequence[torch.Tensor]:
    """The front stage's raw outputs, in manifest order."""
    with torch.inference_mode():
        outputs = stage.module(*args)
    return [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)


def transport_arrays(
    config: ModelConfig, specs: Sequence[TensorSpec], tensors: Sequence[torch.Tensor]
) -> Activations:
    """Outputs as NumPy arrays by name, floats cast to the transport datatype (one cast, none
    when it is the stage's own)."""
    transport = numpy_dtype(config.transport_datatype)
    result: Activations = {}
    for spec, tensor in zip(specs, tensors, strict=True):
        array = tensor.numpy()
        result[spec.name] = (
            array.astype(transport, copy=False) if array.dtype.kind == "f" else array
        )
    return result


def dim_sizes(specs: Sequence[TensorSpec], arrays: Mapping[str, Any]) -> dict[str, int]:
    """The size of each named dim in ``arrays`` (checked against ``specs`` already)."""
    sizes = {BATCH_DIM: 1}
    for spec in specs:
        for dim, size in zip(spec.shape, arrays[spec.name].shape, strict=True):
            if isinstance(dim, DimSpec):
                sizes[dim.name] = int(size)
    return sizes


def _callers_alone(jobs: list[FrontJob]) -> bool:
    return all(job.lone for job in jobs)
