"""Run back stages: decode and check the activations, batch them, compute off the event loop,
split the batch back and restrict each request's rows (which requests share a batch:
``shared.batch_plan``).

The activation monitor judges each batch's requests in the batch worker, in one pass over all
their rows, before the forward: a refused request gets its own error, its neighbours run.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import torch

from private_core.activation_monitor import ActivationMonitor
from private_core.admission import Caller
from private_core.attribution import Attributor
from private_core.budgets import BudgetGate
from private_core.metrics import PrivateMetrics
from private_core.model_store import BackStage, ModelStore
from private_core.policy import restrict_many
from private_core.settings import PrivateSettings
from private_core.watermark.engine import QueryContext
from protos import inference_pb2
from shared import phases
from shared.batch_plan import BatchPlan, assemble, unpad
from shared.batch_plan import plan_batching as shared_plan
from shared.batcher import BatchSettings, DynamicBatcher
from shared.compute_threads import ComputeCallsCollector, ComputeThreads, usable_cores
from shared.errors import InternalError, InvalidInput
from shared.logs import get_logger
from shared.manifest import (
    BATCH_DIM,
    MESSAGE_OVERHEAD_BYTES,
    max_message_bytes,
)
from shared.tensor_codec import from_proto, to_proto
from shared.validation import check_tensors

log = get_logger(__name__)


@dataclass(frozen=True)
class BackRequest:
    """One request's decoded back-stage inputs, their named dim sizes, the k it asked for and
    who asked (for the watermark's trigger log)."""

    arrays: Mapping[str, Any]
    sizes: Mapping[str, int]
    rows: int
    top_k: int
    context: QueryContext | None = None
    screening: Screening | None = None


@dataclass(eq=False)
class Screening:
    """What the activation monitor needs of one request (the caller's certificate identities)
    and the delay its verdict asks for, set by the batch worker."""

    request: inference_pb2.InferRequest
    identities: tuple[str, ...]
    delay_s: float = 0.0


Batcher = DynamicBatcher[BackRequest, dict[str, Any]]


class BackStageRunner:
    """Answers ``InferRequest`` messages with policy-restricted outputs, batching concurrent ones."""

    def __init__(
        self,
        store: ModelStore,
        batcher: Batcher,
        *,
        pad: bool = True,
        admission: BudgetGate | None = None,
        attributor: Attributor | None = None,
        monitor: ActivationMonitor | None = None,
    ) -> None:
        self._store = store
        self._monitor = monitor
        self._batcher = batcher
        self._admission = admission
        self._attributor = attributor
        self._plans: dict[str, BatchPlan] = {}
        for name, stage in store.loaded.items():
            plan = plan_batching(stage, pad=pad)
            self._plans[name] = plan
            rows = batcher.register(
                name,
                partial(run_batch, stage, plan, monitor=monitor),
                stage.config.max_batch_size,
            )
            log.info(
                "batching_planned",
                model=name,
                max_rows=rows if plan.batchable else 1,
                padded=sorted(plan.padded),
            )

    async def infer(
        self,
        request: inference_pb2.InferRequest,
        caller: Caller | None = None,
        identities: Sequence[str] = (),
    ) -> inference_pb2.InferResponse:
        """Check one request, count it against ``caller``'s budgets, run it in a batch and
        restrict its answer. A bad or refused request never reaches the batcher; the activation
        monitor judges it in its batch, under its certificate ``identities``."""
        stage = self._store.get(request.model)
        arrays = _decode(request)
        sizes = check_tensors(
            stage.manifest.inputs, arrays, transport=stage.config.transport_datatype
        )
        batch = sizes.get(BATCH_DIM, 0)
        if batch > stage.config.max_batch_size:
            raise InvalidInput(
                f"batch {batch} exceeds this model's limit {stage.config.max_batch_size}"
            )
        phases.mark("decoded_checked")
        context = QueryContext.of(request)
        if self._attributor is not None:  # signature checks: refused before any budget or compute
            context = await self._attributor.attribute(request, stage.manifest, arrays, sizes)
        phases.mark("attributed")
        if caller is not None and context.attribution == "signed":
            caller = replace(caller, signed=True)  # counted against the identity's signed budget
        await self._admit(caller, request.model, max(batch, 1))
        phases.mark("admitted")
        plan = self._plans[request.model]
        # The activation monitor sees only valid, admitted requests.
        screening = None if self._monitor is None else Screening(request, tuple(identities))
        job = BackRequest(arrays, sizes, batch, int(request.top_k), context, screening)
        outputs = await self._batcher.submit(
            request.model, job, key=plan.key(stage.manifest.inputs, arrays), rows=max(batch, 1)
        )
        phases.mark("batch_resolved")
        if screening is not None and screening.delay_s > 0:  # a throttled stream
            await asyncio.sleep(screening.delay_s)
        return inference_pb2.InferResponse(
            model=request.model,
            outputs=[to_proto(name, value) for name, value in outputs.items()],
            policy=stage.config.policy.kind,
        )

    async def _admit(self, caller: Caller | None, model: str, samples: int) -> None:
        if self._admission is None:
            return
        if caller is None:  # fail closed: a call with budgets but no identity is a bug
            raise InternalError("no caller identity to count the request against")
        await self._admission.admit(caller, model, samples)


def _decode(request: inference_pb2.InferRequest) -> dict[str, Any]:
    arrays: dict[str, Any] = {}
    for tensor in request.inputs:
        if tensor.name in arrays:
            raise InvalidInput(f"input {tensor.name!r} was sent twice")
        arrays[tensor.name] = from_proto(tensor)  # a read-only view of the request bytes
    return arrays


def run_batch(
    stage: BackStage,
    plan: BatchPlan,
    requests: list[BackRequest],
    monitor: ActivationMonitor | None = None,
) -> list[dict[str, Any] | Exception]:
    """The monitor's verdicts on ``requests`` (in a worker thread), then one forward for those it
    lets through and each one's restricted rows; a refused request gets its error alone."""
    refusals = screen(monitor, requests)
    phases.mark("screened")
    answered = [r for r, refused in zip(requests, refusals, strict=True) if refused is None]
    results = iter(compute_batch(stage, plan, answered) if answered else [])
    return [next(results) if refused is None else refused for refused in refusals]


def screen(
    monitor: ActivationMonitor | None, requests: Sequence[BackRequest]
) -> list[Exception | None]:
    """Each request's refusal (None: answer it), the monitor's verdicts in one pass; a throttle
    is left in the request's ``Screening``. The monitor failing refuses them all (fail closed)."""
    screened = [(i, r.screening) for i, r in enumerate(requests) if r.screening is not None]
    refusals: list[Exception | None] = [None] * len(requests)
    if monitor is None or not screened:
        return refusals
    calls = [(screening.request, screening.identities) for _, screening in screened]
    try:
        verdicts = monitor.check_many(calls, [requests[i].arrays for i, _ in screened])
    except Exception as error:
        log.exception("private_monitor_failed")
        return [error] * len(requests)
    for (index, screening), verdict in zip(screened, verdicts, strict=True):
        if isinstance(verdict, Exception):
            refusals[index] = verdict
        elif verdict.error is not None:
            refusals[index] = verdict.error
        else:
            screening.delay_s = verdict.delay_s
    return refusals


def compute_batch(
    stage: BackStage, plan: BatchPlan, requests: list[BackRequest]
) -> list[dict[str, Any] | Exception]:
    """One forward for all ``requests``, then each one's restricted rows (``restrict_many``).

    When a batch of several fails, each request runs alone so one bad request fails alone.
    """
    try:
        output = forward(stage, assemble(stage.manifest, [r.arrays for r in requests]))
        phases.mark("forward_done")
    except Exception:
        if len(requests) == 1:
            raise
        return [_alone(stage, plan, request) for request in requests]
    outputs: list[torch.Tensor] = []
    start = 0
    for request in requests:
        rows = output if len(requests) == 1 else output[start : start + request.rows]
        outputs.append(unpad(rows, stage.manifest.outputs[0], plan, request.sizes))
        start += request.rows
    return restrict_many(
        stage,
        outputs,
        [r.arrays for r in requests],
        [r.top_k for r in requests],
        [r.context for r in requests],
    )


def _alone(stage: BackStage, plan: BatchPlan, request: BackRequest) -> dict[str, Any] | Exception:
    try:
        return compute_batch(stage, plan, [request])[0]
    except Exception as error:
        return error


def forward(stage: BackStage, args: list[torch.Tensor]) -> torch.Tensor:
    """The back stage's raw output for assembled inputs."""
    with torch.inference_mode():
        output: torch.Tensor = stage.module(*args)
    return output


def plan_batching(stage: BackStage, *, pad: bool) -> BatchPlan:
    """Whether ``stage`` batches (it has one output), and along which dims it pads."""
    if len(stage.manifest.outputs) != 1:
        return BatchPlan(batchable=False)

    def outputs(args: list[torch.Tensor]) -> list[torch.Tensor]:
        return [forward(stage, args)]

    return shared_plan(stage.manifest, outputs, name=stage.config.name, pad=pad)


def request_bytes_limit(stages: Mapping[str, BackStage]) -> tuple[int, str]:
    """The largest request any model may be sent, in bytes, and that model's name."""
    largest, which = MESSAGE_OVERHEAD_BYTES, ""
    for name, stage in stages.items():
        total = max_message_bytes(stage.manifest.inputs, stage.config)
        if total > largest:
            largest, which = total, name
    return largest, which


def configure_torch_threads(intra_op: int, inter_op: int) -> None:
    """Set torch's thread pools once per process (see the README on oversubscription)."""
    torch.set_num_threads(intra_op)
    if torch.get_num_interop_threads() == inter_op:
        return
    try:
        torch.set_num_interop_threads(inter_op)
    except RuntimeError:  # only settable before any inter-op work; keep what is set
        log.info("interop_threads_unchanged", wanted=inter_op, kept=torch.get_num_interop_threads())


def message_limit(configured_bytes: int, stages: Mapping[str, BackStage]) -> int:
    """The gRPC message limit: the configured one, raised to fit the largest allowed request."""
    needed, model = request_bytes_limit(stages)
    limit = max(configured_bytes, needed)
    log.info(
        "grpc_message_limit",
        configured_bytes=configured_bytes,
        needed_bytes=needed,
        largest_model=model,
        limit_bytes=limit,
    )
    return limit


def build_runner(
    store: ModelStore,
    executor: Executor,
    metrics: PrivateMetrics,
    settings: PrivateSettings,
    admission: BudgetGate | None = None,
    attributor: Attributor | None = None,
    monitor: ActivationMonitor | None = None,
) -> tuple[BackStageRunner, Batcher]:
    """The runner and its batcher, configured from the tier's settings."""

    def observe(model: str, rows: int, seconds: float) -> None:
        metrics.observe_batch(model, rows)
        metrics.observe_back_stage(model, seconds)

    batch_settings = BatchSettings(
        max_batch_size=settings.max_batch_size,
        max_queue_delay_s=settings.max_queue_delay_us / 1e6,
        max_queue_size=settings.max_queue_size,
        concurrent_batches=settings.concurrent_batches,
    )
    threads = ComputeThreads(
        settings.lone_request_threads or usable_cores(), settings.torch_threads
    )
    metrics.registry.register(ComputeCallsCollector(threads))
    batcher: Batcher = DynamicBatcher(
        executor, batch_settings, observe, threads, metrics.observe_queue_wait
    )
    runner = BackStageRunner(
        store,
        batcher,
        pad=settings.pad_batches,
        admission=admission,
        attributor=attributor,
        monitor=monitor,
    )
    return runner, batcher
