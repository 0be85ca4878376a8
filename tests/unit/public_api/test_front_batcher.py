"""The front batcher with the real digits and MiniLM front stages: concurrent calls share a
batch, a bad request fails alone, a lone request starts at once, and batched answers (MiniLM's
padded to the longest sequence) equal unbatched ones.

Every wait is on an event (a batch started, rows queued), never on a sleep; the 10 s bounds
only stop a hang.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
import torch

from public_api.front import FrontRunner, FrontStage, load_front_stages, run_front
from public_api.front_batch_settings import FrontBatchLimits, FrontBatchSettings
from public_api.front_batcher import FrontBatcher, front_outputs
from shared.batch_plan import BatchPlan
from shared.compute_threads import ComputeThreads
from splitvault.demo import minilm
from tests.conftest import Deployment, DigitsFixture


class Gated(torch.nn.Module):
    """Runs the wrapped stage, noting each call's batch size; with a closed ``gate`` each call
    waits for it; a batch holding a NaN image is refused (a request that breaks its batch)."""

    def __init__(self, inner: torch.nn.Module, gate: threading.Event | None = None) -> None:
        super().__init__()
        self.inner = inner
        self.closed_gate = gate
        self.gate: threading.Event | None = None  # open until armed (the plan's probe runs)
        self.batches: list[int] = []
        self.started = threading.Semaphore(0)

    def arm(self) -> None:
        """Forget the calls so far and close the gate from now on."""
        self.gate, self.batches, self.started = self.closed_gate, [], threading.Semaphore(0)

    def forward(self, *args: torch.Tensor) -> Any:
        self.batches.append(len(args[0]))
        self.started.release()
        if self.gate is not None:
            assert self.gate.wait(10)
        if args[0].dtype.is_floating_point and bool(torch.isnan(args[0]).any()):
            raise ValueError("refused")
        return self.inner(*args)

    async def wait_started(self) -> None:
        assert await asyncio.to_thread(self.started.acquire, timeout=10), "no batch started"


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(2, thread_name_prefix="front-stage") as executor:
        yield executor


@pytest.fixture(scope="module")
def stages(deployment: Deployment) -> dict[str, FrontStage]:
    return load_front_stages(deployment.layout.public)


def _gated(stage: FrontStage, gate: threading.Event | None = None) -> tuple[FrontStage, Gated]:
    module = Gated(stage.module, gate)
    return dataclasses.replace(stage, module=module), module


def _batcher(
    pool: ThreadPoolExecutor, stage: FrontStage, threads: ComputeThreads | None = None, **kw: Any
) -> FrontBatcher:
    """A batcher serving ``stage``; a gated stage's gate closes after the startup probe."""
    kw.setdefault("concurrent_batches", 1)
    batcher = FrontBatcher(pool, FrontBatchSettings(**kw), threads or ComputeThreads(1, 1))
    batcher.register(stage)
    if isinstance(stage.module, Gated):
        stage.module.arm()
    return batcher


async def _until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(10):
        while not condition():
            await asyncio.sleep(0.001)


def _images(digits_model: DigitsFixture, start: int, rows: int) -> dict[str, Any]:
    return {"image": digits_model.data.test_x[start : start + rows]}


async def test_calls_queued_behind_a_running_batch_share_the_next(
    pool: ThreadPoolExecutor, stages: dict[str, FrontStage], digits_model: DigitsFixture
) -> None:
    gate = threading.Event()
    stage, module = _gated(stages["digits"], gate)
    batcher = _batcher(pool, stage, max_queue_delay_us=1_000_000)
    first = asyncio.ensure_future(batcher.run(stage, _images(digits_model, 0, 1), 1, lone=False))
    await module.wait_started()  # holds the model's only batch slot
    rows = [1, 3, 2, 1]
    inputs = [_images(digits_model, 10 * i, n) for i, n in enumerate(rows, start=1)]
    queued = [
        asyncio.ensure_future(batcher.run(stage, x, len(x["image"]), lone=False)) for x in inputs
    ]
    await _until(lambda: batcher.queued_rows("digits") == sum(rows))
    gate.set()
    answers = await asyncio.gather(first, *queued)
    assert module.batches == [1, sum(rows)]  # the four queued calls ran as one
    for x, answer in zip([_images(digits_model, 0, 1), *inputs], answers, strict=True):
        alone = run_front(stages["digits"], x)
        for name, value in alone.items():
            assert answer[name].shape == value.shape
            # Within one FP16 step: the batched convolution's FP32 sums may round differently,
            # and the transport cast can carry that across an FP16 boundary.
            np.testing.assert_allclose(answer[name], value, atol=1e-6, rtol=2**-10)
    await batcher.close()


async def test_a_request_that_breaks_its_batch_fails_alone(
    pool: ThreadPoolExecutor, stages: dict[str, FrontStage], digits_model: DigitsFixture
) -> None:
    gate = threading.Event()
    stage, module = _gated(stages["digits"], gate)
    batcher = _batcher(pool, stage, max_queue_delay_us=1_000_000)
    first = asyncio.ensure_future(batcher.run(stage, _images(digits_model, 0, 1), 1, lone=False))
    await module.wait_started()
    bad = _images(digits_model, 5, 2)
    bad["image"] = bad["image"].copy()
    bad["image"][1, 0, 0, 0] = np.nan
    inputs = [_images(digits_model, 1, 1), bad, _images(digits_model, 3, 2)]
    queued = [
        asyncio.ensure_future(batcher.run(stage, x, len(x["image"]), lone=False)) for x in inputs
    ]
    await _until(lambda: batcher.queued_rows("digits") == 5)
    gate.set()
    results = await asyncio.gather(first, *queued, return_exceptions=True)
    assert isinstance(results[2], ValueError)
    assert module.batches == [1, 5, 1, 2, 2]  # the batch failed; each then ran alone
    for x, answer in ((inputs[0], results[1]), (inputs[2], results[3])):
        assert isinstance(answer, dict)
        np.testing.assert_array_equal(answer["relu"], run_front(stages["digits"], x)["relu"])
    await batcher.close()


async def test_a_lone_request_starts_at_once_on_every_core(
    pool: ThreadPoolExecutor, stages: dict[str, FrontStage], digits_model: DigitsFixture
) -> None:
    stage, module = _gated(stages["digits"])
    threads = ComputeThreads(2, 1)
    # An hour's queue delay (past what settings allow): a request on an idle model held for
    # company would hang here.
    hour = FrontBatchSettings.model_construct(max_queue_delay_us=3600 * 10**6, concurrent_batches=1)
    batcher = FrontBatcher(pool, hour, threads)
    batcher.register(stage)
    async with asyncio.timeout(10):
        await batcher.run(stage, _images(digits_model, 0, 1), 1, lone=True)
        await batcher.run(stage, _images(digits_model, 1, 1), 1, lone=False)
    assert module.batches == [1, 1]
    assert threads.calls_by_threads() == {2: 1, 1: 1}  # lone: every core; else the loaded count
    await batcher.close()


async def test_closing_refuses_queued_calls(
    pool: ThreadPoolExecutor, stages: dict[str, FrontStage], digits_model: DigitsFixture
) -> None:
    gate = threading.Event()
    stage, module = _gated(stages["digits"], gate)
    batcher = _batcher(pool, stage, max_queue_delay_us=1_000_000)
    first = asyncio.ensure_future(batcher.run(stage, _images(digits_model, 0, 1), 1, lone=False))
    await module.wait_started()
    queued = asyncio.ensure_future(batcher.run(stage, _images(digits_model, 1, 1), 1, lone=False))
    await _until(lambda: batcher.queued_rows("digits") == 1)
    closing = asyncio.ensure_future(batcher.close())
    gate.set()
    await closing
    assert isinstance(await first, dict)
    with pytest.raises(Exception, match="public tier is shutting down"):
        await queued


def test_plans(stages: dict[str, FrontStage], pool: ThreadPoolExecutor) -> None:
    def plan(name: str, **settings: Any) -> BatchPlan:
        batcher = FrontBatcher(pool, FrontBatchSettings(**settings), ComputeThreads(1, 1))
        return batcher.register(stages[name])

    assert plan("digits") == BatchPlan(batchable=True)
    assert plan("minilm") == BatchPlan(batchable=True, padded=frozenset({"seq"}))
    assert plan("minilm", pad_batches=False) == BatchPlan(batchable=True)


async def test_minilm_pads_to_the_longest_and_equals_unbatched(
    pool: ThreadPoolExecutor, stages: dict[str, FrontStage]
) -> None:
    """Sentences of different lengths in one batch: each request's activations, cut back to its
    own length, equal its unbatched ones within 1e-5 (FP32, before the FP16 transport cast) and
    within one FP16 step after it."""
    gate = threading.Event()
    stage, module = _gated(stages["minilm"], gate)
    batcher = _batcher(pool, stage, max_queue_delay_us=1_000_000)
    groups = [minilm.SENTENCES[:1], minilm.SENTENCES[2:4], minilm.SENTENCES, ["Short."]]
    inputs = [{n: t.numpy() for n, t in minilm.tokenize(g).items()} for g in groups]
    assert len({x["input_ids"].shape[1] for x in inputs}) > 2  # the lengths differ
    first = asyncio.ensure_future(batcher.run(stage, inputs[0], 1, lone=False))
    await module.wait_started()
    queued = [
        asyncio.ensure_future(batcher.run(stage, x, len(x["input_ids"]), lone=False))
        for x in inputs
    ]
    await _until(lambda: batcher.queued_rows("minilm") == sum(len(x["input_ids"]) for x in inputs))
    gate.set()
    answers = await asyncio.gather(first, *queued)
    assert module.batches == [1, sum(len(x["input_ids"]) for x in inputs)]
    for x, answer in zip(inputs, answers[1:], strict=True):
        alone = run_front(stages["minilm"], x)["layer_norm_4"]
        assert answer["layer_norm_4"].shape == alone.shape == (*x["input_ids"].shape, 384)
        np.testing.assert_allclose(
            answer["layer_norm_4"].astype(np.float32),
            alone.astype(np.float32),
            rtol=1e-3,
            atol=1e-3,
        )
    # Before the transport cast: the padded batch's own rows against each request alone.
    names = ("input_ids", "attention_mask")
    raw_alone = [
        front_outputs(stages["minilm"], [torch.from_numpy(x[n]) for n in names])[0] for x in inputs
    ]
    together = _padded_forward(stages["minilm"], inputs)
    start = 0
    for x, single in zip(inputs, raw_alone, strict=True):
        rows, seq = x["input_ids"].shape
        torch.testing.assert_close(together[start : start + rows, :seq], single, atol=1e-5, rtol=0)
        start += rows
    await batcher.close()


def _padded_forward(stage: FrontStage, inputs: list[dict[str, Any]]) -> torch.Tensor:
    """Token ids and masks zero-padded to the longest by hand, run as one call."""
    longest = max(x["input_ids"].shape[1] for x in inputs)

    def padded(name: str) -> torch.Tensor:
        arrays = [np.pad(x[name], ((0, 0), (0, longest - x[name].shape[1]))) for x in inputs]
        return torch.from_numpy(np.concatenate(arrays))

    return front_outputs(stage, [padded("input_ids"), padded("attention_mask")])[0]


async def test_the_runner_batches_calls_that_go_to_the_pool(
    pool: ThreadPoolExecutor, stages: dict[str, FrontStage], digits_model: DigitsFixture
) -> None:
    stage, module = _gated(stages["digits"])
    runner = FrontRunner(pool, 0.0, batching=FrontBatchSettings(concurrent_batches=1))
    runner.batch(stage)
    # All five are queued before the model's scheduler task first runs: one batch.
    calls = [
        asyncio.ensure_future(runner.run(stage, _images(digits_model, i, 1), 1)) for i in range(5)
    ]
    answers = await asyncio.gather(*calls)
    assert module.batches == [5]
    for i, answer in enumerate(answers):
        # Within one FP16 step, as above: on this CPU one value of a batch of 5 crossed an FP16
        # boundary (0.0098190 against 0.0098114 alone).
        np.testing.assert_allclose(
            answer["relu"],
            run_front(stages["digits"], _images(digits_model, i, 1))["relu"],
            atol=1e-6,
            rtol=2**-10,
        )
    await runner.close()


async def test_a_model_has_its_own_batch_limit(
    pool: ThreadPoolExecutor, stages: dict[str, FrontStage], digits_model: DigitsFixture
) -> None:
    gate = threading.Event()
    stage, module = _gated(stages["digits"], gate)
    own = {"digits": FrontBatchLimits(max_batch_size=2), "minilm": FrontBatchLimits()}
    batcher = _batcher(pool, stage, max_queue_delay_us=1_000_000, max_batch_size=8, models=own)
    first = asyncio.ensure_future(batcher.run(stage, _images(digits_model, 0, 1), 1, lone=False))
    await module.wait_started()
    queued = [
        asyncio.ensure_future(batcher.run(stage, _images(digits_model, i, 1), 1, lone=False))
        for i in range(1, 6)
    ]
    await _until(lambda: batcher.queued_rows("digits") == 5)
    gate.set()
    await asyncio.gather(first, *queued)
    assert module.batches == [1, 2, 2, 1]  # digits' own limit, not the tier's 8
    await batcher.close()
