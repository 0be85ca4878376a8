"""Dynamic batching: concurrent requests for one model run as one call (Triton's dynamic batcher).

Both tiers use it: the private tier for back stages, the public tier for front stages.

Each model has a bounded FIFO queue and one scheduler task. The scheduler takes the oldest
request and the queued requests that may share its batch (the same *group key*) up to the
model's row limit. While another batch of the model runs, it waits at most ``max_queue_delay``
from the oldest request's arrival for the batch to fill; when none runs, it starts at once
(waiting on an idle model only adds latency: nothing else would be computing meanwhile). The batch runs in the thread pool as one call that returns one result (or
exception) per request, and each caller gets its own.

Memory stays bounded: a model's queue holds at most ``max_queue_size`` rows (a single request
is admitted into an empty queue whatever its size, within the model's batch limit checked
earlier), and a full queue refuses new requests with ``Overloaded`` (gRPC RESOURCE_EXHAUSTED,
503 with ``Retry-After``). A caller that goes away (deadline, cancel)
leaves the queue at once; if its batch already runs, its rows are computed and dropped.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Executor
from dataclasses import dataclass
from functools import partial
from typing import Generic, TypeVar

from shared import phases
from shared.compute_threads import ComputeThreads
from shared.errors import Overloaded, Unavailable
from shared.logs import get_logger

log = get_logger(__name__)
P = TypeVar("P")  # what one request carries into a batch
R = TypeVar("R")  # what one request gets back
# Runs one batch in a worker thread: one result or exception per payload, in order.
RunBatch = Callable[[list[P]], list[R | Exception]]
# Called after each batch with (model, rows, seconds).
BatchObserver = Callable[[str, int, float], None]
# Called as each request's batch starts with (model, seconds it waited in the queue).
WaitObserver = Callable[[str, float], None]
# Whether the callers of a batch of one saw their tier otherwise idle (it may use every core).
LoneCheck = Callable[[list[P]], bool]


@dataclass(frozen=True)
class BatchSettings:
    """How requests are gathered; ``max_batch_size`` = 1 and no delay turns batching off."""

    max_batch_size: int | None = None  # rows per call; None: each model's own limit
    max_queue_delay_s: float = 0.002
    max_queue_size: int = 512  # rows waiting per model
    concurrent_batches: int = 2  # batches of one model running at once (pool permitting)


@dataclass(eq=False)
class _Job(Generic[P, R]):
    payload: P
    key: Hashable | None  # None: never shares a batch
    rows: int
    future: asyncio.Future[R]
    arrived: float


class _Lane(Generic[P, R]):
    """One model's queue, the function that runs its batches, and its scheduler task."""

    def __init__(
        self, name: str, run: RunBatch[P, R], max_rows: int, slots: int, delay_s: float
    ) -> None:
        self.name = name
        self.run = run
        self.max_rows = max_rows
        self.delay_s = delay_s
        self.jobs: list[_Job[P, R]] = []
        self.rows = 0
        self.changed = asyncio.Event()
        self.slots = asyncio.Semaphore(slots)
        self.scheduler: asyncio.Task[None] | None = None
        self.running: set[asyncio.Task[None]] = set()
        self.active = 0  # batches started and not yet finished

    def add(self, job: _Job[P, R]) -> None:
        self.jobs.append(job)
        self.rows += job.rows
        self.changed.set()

    def take(self, jobs: list[_Job[P, R]]) -> None:
        chosen = {id(job) for job in jobs}
        self.jobs = [job for job in self.jobs if id(job) not in chosen]
        self.rows -= sum(job.rows for job in jobs)

    def discard(self, job: _Job[P, R]) -> None:
        if any(queued is job for queued in self.jobs):
            self.take([job])

    def select(self) -> tuple[list[_Job[P, R]], bool]:
        """The oldest job and the later ones that share its batch; and whether it is full."""
        head = self.jobs[0]
        chosen, rows = [head], head.rows
        if head.key is None:
            return chosen, True
        for job in self.jobs[1:]:
            if job.key != head.key or job.future.done():
                continue
            if rows + job.rows > self.max_rows:
                return chosen, True
            chosen.append(job)
            rows += job.rows
        return chosen, rows >= self.max_rows


class DynamicBatcher(Generic[P, R]):
    """Per-model bounded queues whose requests run in batches in ``executor``."""

    def __init__(
        self,
        executor: Executor,
        settings: BatchSettings,
        observe: BatchObserver | None = None,
        threads: ComputeThreads | None = None,
        observe_wait: WaitObserver | None = None,
        *,
        tier: str = "private",
        lone: LoneCheck[P] | None = None,
    ) -> None:
        """``threads``: run each batch through it, as lone when it is the tier's only work (and
        ``lone`` says its callers saw nothing else running); ``tier`` names it in refusals."""
        self._executor = executor
        self._settings = settings
        self._observe = observe
        self._threads = threads
        self._observe_wait = observe_wait
        self._shutting_down = f"the {tier} tier is shutting down"
        self._lone = lone
        self._lanes: dict[str, _Lane[P, R]] = {}
        self._closed = False

    def register(
        self,
        name: str,
        run: RunBatch[P, R],
        model_max_rows: int,
        *,
        max_batch_size: int | None = None,
        max_queue_delay_s: float | None = None,
    ) -> int:
        """Serve model ``name`` with ``run``; returns its rows per batch (capped by settings,
        or by ``max_batch_size`` and ``max_queue_delay_s`` given for this model)."""
        cap = self._settings.max_batch_size if max_batch_size is None else max_batch_size
        max_rows = model_max_rows if cap is None else max(1, min(cap, model_max_rows))
        delay = self._settings.max_queue_delay_s if max_queue_delay_s is None else max_queue_delay_s
        slots = self._settings.concurrent_batches
        self._lanes[name] = _Lane(name, run, max_rows, slots, delay)
        return max_rows

    def queued_rows(self, name: str) -> int:
        """Rows of model ``name`` waiting for a batch (not those already running)."""
        return self._lanes[name].rows

    async def submit(self, name: str, payload: P, *, key: Hashable | None, rows: int) -> R:
        """Queue one request of ``rows`` rows and wait for its own result."""
        if self._closed:
            raise Unavailable(self._shutting_down, retry_after_s=1.0)
        lane = self._lanes[name]
        limit = self._settings.max_queue_size
        if lane.rows and lane.rows + rows > limit:
            raise Overloaded(
                f"model {name!r} is overloaded ({lane.rows} rows queued, limit {limit})",
                retry_after_s=1.0,
            )
        loop = asyncio.get_running_loop()
        job: _Job[P, R] = _Job(payload, key, rows, loop.create_future(), loop.time())
        lane.add(job)
        if lane.scheduler is None:
            lane.scheduler = asyncio.create_task(self._schedule(lane), name=f"batcher-{name}")
        try:
            return await job.future
        except asyncio.CancelledError:
            lane.discard(job)  # a caller that gave up frees its place at once
            raise

    async def close(self) -> None:
        """Stop scheduling, let running batches finish, refuse what is still queued."""
        self._closed = True
        for lane in self._lanes.values():
            if lane.scheduler is not None:
                lane.scheduler.cancel()
        for lane in self._lanes.values():
            await asyncio.gather(*lane.running, return_exceptions=True)
            for job in lane.jobs:
                if not job.future.done():
                    job.future.set_exception(Unavailable(self._shutting_down))
            lane.take(list(lane.jobs))

    async def _schedule(self, lane: _Lane[P, R]) -> None:
        while True:
            await lane.slots.acquire()
            try:
                jobs = await self._gather(lane)
            except BaseException:
                lane.slots.release()
                raise
            lane.active += 1
            task = asyncio.create_task(self._run(lane, jobs))
            lane.running.add(task)
            task.add_done_callback(lane.running.discard)

    async def _gather(self, lane: _Lane[P, R]) -> list[_Job[P, R]]:
        """The oldest job's batch, once full, or once it waited the maximum delay, or at once
        if no batch of the model is running."""
        loop = asyncio.get_running_loop()
        while True:
            if not lane.jobs:
                lane.changed.clear()
                await lane.changed.wait()
                continue
            jobs, full = lane.select()
            wait = lane.jobs[0].arrived + lane.delay_s - loop.time()
            if full or wait <= 0 or lane.active == 0:
                lane.take(jobs)
                return jobs
            lane.changed.clear()
            try:
                async with asyncio.timeout(wait):
                    await lane.changed.wait()
            except TimeoutError:
                pass

    async def _run(self, lane: _Lane[P, R], jobs: list[_Job[P, R]]) -> None:
        """Run one batch in the pool and hand each caller its own result."""
        live = [job for job in jobs if not job.future.done()]
        try:
            if live:
                results = await self._call(lane, live)
                for job, result in zip(live, results, strict=True):
                    _resolve(job, result)
        finally:
            lane.active -= 1
            lane.slots.release()
            for job in live:  # only when the batch itself was interrupted
                _resolve(job, Unavailable(self._shutting_down))

    async def _call(self, lane: _Lane[P, R], jobs: list[_Job[P, R]]) -> list[R | Exception]:
        loop = asyncio.get_running_loop()
        if self._observe_wait is not None:
            for job in jobs:
                self._observe_wait(lane.name, loop.time() - job.arrived)
        started = time.perf_counter()
        payloads = [job.payload for job in jobs]
        phases.mark("batch_dispatched")
        try:
            if self._threads is None:
                results = await loop.run_in_executor(self._executor, lane.run, payloads)
            else:
                lone = len(jobs) == 1 and self._quiet()
                lone = lone and (self._lone is None or self._lone(payloads))
                rows = sum(job.rows for job in jobs)
                batch = partial(lane.run, payloads)
                call = partial(self._threads.run, lone, batch, key=lane.name, rows=rows)
                results = await loop.run_in_executor(self._executor, call)
            phases.mark("batch_returned")
            if len(results) != len(jobs):
                raise RuntimeError(f"{len(jobs)} requests got {len(results)} results")
        except Exception as error:  # the call itself failed: every caller gets the error
            log.warning("batch_failed", model=lane.name, error=type(error).__name__)
            return [error] * len(jobs)
        if self._observe is not None:
            self._observe(lane.name, sum(job.rows for job in jobs), time.perf_counter() - started)
        return results

    def _quiet(self) -> bool:
        """Nothing queued and no other batch running, in any model (the caller's batch is)."""
        lanes = self._lanes.values()
        return sum(lane.active for lane in lanes) <= 1 and not any(lane.rows for lane in lanes)


def _resolve(job: _Job[P, R], result: R | Exception) -> None:
    """Hand ``result`` to the job's caller, unless it went away or was already answered."""
    if job.future.done():
        return
    if isinstance(result, Exception):
        job.future.set_exception(result)
    else:
        job.future.set_result(result)
