"""Dynamic batching: scheduling, the queue bound and cancellation with a plain batch function;
batched answers equal unbatched ones with the real digits and MiniLM back stages."""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from private_core.metrics import PrivateMetrics
from private_core.model_store import BackStage, ModelStore, load_back_stage
from private_core.policy import EMBEDDING, INDICES, SCORES
from private_core.runner import (
    BackRequest,
    BackStageRunner,
    forward,
    message_limit,
    plan_batching,
    request_bytes_limit,
    run_batch,
)
from protos import inference_pb2
from public_api.front import FrontStage, load_front_stages
from shared.batch_plan import BatchPlan, assemble, unpad
from shared.batcher import BatchSettings, DynamicBatcher
from shared.compute_threads import ComputeThreads
from shared.errors import Overloaded, Unavailable
from shared.tensor_codec import to_proto
from splitvault.demo import minilm
from tests.conftest import Deployment, DigitsFixture

# --- scheduling, with a batch function that records what it was given ----------------------
#
# Every wait below is on an event or a condition (a batch started, rows queued), never on a
# sleep: which requests share a batch must not depend on how fast the machine is.


class Recorder:
    """A batch function: answers each payload with itself times ten, remembers every batch.

    With a ``gate`` each batch is recorded as it starts, then waits for the gate to open, so a
    test holds batches running; ``peak`` is the most batches that ever ran at once.
    """

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.batches: list[list[int]] = []
        self.gate = gate
        self.started = threading.Semaphore(0)
        self.running = 0
        self.peak = 0
        self._lock = threading.Lock()

    def __call__(self, payloads: list[int]) -> list[int | Exception]:
        with self._lock:
            self.batches.append(list(payloads))
            self.running += 1
            self.peak = max(self.peak, self.running)
        self.started.release()
        try:
            if self.gate is not None:
                self.gate.wait(10)
        finally:
            with self._lock:
                self.running -= 1
        return [ValueError(f"bad {p}") if p < 0 else p * 10 for p in payloads]

    async def wait_started(self, count: int = 1) -> None:
        """Until ``count`` more batches have started (10 s at most: they start in ms)."""
        for _ in range(count):
            assert await asyncio.to_thread(self.started.acquire, timeout=10), "no batch started"


async def _until(condition: Callable[[], bool]) -> None:
    """Yield to the loop until ``condition()``; 10 s only stops a hang (it takes ms)."""
    async with asyncio.timeout(10):
        while not condition():
            await asyncio.sleep(0.001)


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(3) as executor:
        yield executor


def _batcher(
    pool: ThreadPoolExecutor, run: Recorder, model_rows: int = 64, **settings: Any
) -> DynamicBatcher[int, int]:
    settings.setdefault("concurrent_batches", 1)
    batcher: DynamicBatcher[int, int] = DynamicBatcher(pool, BatchSettings(**settings))
    batcher.register("m", run, model_rows)
    return batcher


def _submit(batcher: DynamicBatcher[int, int], payload: int, rows: int = 1) -> asyncio.Future[int]:
    return asyncio.ensure_future(batcher.submit("m", payload, key="k", rows=rows))


async def test_concurrent_requests_run_as_one_call(pool: ThreadPoolExecutor) -> None:
    run = Recorder()
    batcher = _batcher(pool, run, max_queue_delay_s=0.2)
    # All eight are queued before the scheduler task first runs (tasks run in creation order).
    answers = await asyncio.gather(*(batcher.submit("m", i, key="k", rows=1) for i in range(8)))
    assert answers == [i * 10 for i in range(8)]
    assert run.batches == [list(range(8))]
    await batcher.close()


async def test_requests_queued_behind_a_running_batch_share_the_next(
    pool: ThreadPoolExecutor,
) -> None:
    gate = threading.Event()
    run = Recorder(gate)
    batcher = _batcher(pool, run, max_queue_delay_s=30.0)
    first = _submit(batcher, 0)
    await run.wait_started()  # holds the model's only batch slot until the gate opens
    rows = [1, 2, 1, 3, 1]
    queued = [_submit(batcher, i, rows=n) for i, n in enumerate(rows, start=1)]
    await _until(lambda: batcher.queued_rows("m") == sum(rows))
    gate.set()
    assert await asyncio.gather(first, *queued) == [0, 10, 20, 30, 40, 50]
    assert run.batches == [[0], [1, 2, 3, 4, 5]]  # five requests, eight rows, one batch
    await batcher.close()


async def test_a_full_batch_does_not_wait_for_the_delay(pool: ThreadPoolExecutor) -> None:
    run = Recorder()
    batcher = _batcher(pool, run, max_batch_size=4, max_queue_delay_s=30.0)
    async with asyncio.timeout(10):  # does not hang: the 30 s delay would fail this
        answers = await asyncio.gather(*(batcher.submit("m", i, key="k", rows=2) for i in range(4)))
    assert answers == [0, 10, 20, 30]
    assert run.batches == [[0, 1], [2, 3]]  # 4 rows each: the tier cap below the model's 64
    await batcher.close()


async def test_an_idle_model_starts_at_once(pool: ThreadPoolExecutor) -> None:
    run = Recorder()
    batcher = _batcher(pool, run, max_queue_delay_s=30.0)
    async with asyncio.timeout(10):  # does not hang: waiting out the 30 s delay would fail this
        assert await batcher.submit("m", 1, key="k", rows=1) == 10
        assert await batcher.submit("m", 2, key="k", rows=1) == 20
    assert run.batches == [[1], [2]]
    await batcher.close()


async def test_a_free_slot_waits_for_its_batch_to_fill(pool: ThreadPoolExecutor) -> None:
    gate = threading.Event()
    run = Recorder(gate)
    batcher = _batcher(pool, run, max_batch_size=3, max_queue_delay_s=30.0, concurrent_batches=2)
    first = _submit(batcher, 0)
    await run.wait_started()  # runs alone, at once
    later = [_submit(batcher, i) for i in (1, 2)]
    await _until(lambda: batcher.queued_rows("m") == 2)  # a slot is free, yet they wait
    assert run.batches == [[0]]
    later.append(_submit(batcher, 3))  # fills the batch of three: it starts without the delay
    await run.wait_started()
    gate.set()
    assert await asyncio.gather(first, *later) == [0, 10, 20, 30]
    assert run.batches == [[0], [1, 2, 3]]
    await batcher.close()


async def test_a_partial_batch_starts_after_the_delay(pool: ThreadPoolExecutor) -> None:
    gate = threading.Event()
    run = Recorder(gate)
    batcher = _batcher(pool, run, max_batch_size=4, max_queue_delay_s=0.05, concurrent_batches=2)
    first = _submit(batcher, 0)
    await run.wait_started()
    second = _submit(batcher, 1)
    await run.wait_started()  # not full, the first still running: only the delay starts it
    assert run.batches == [[0], [1]]
    gate.set()
    assert (await first, await second) == (0, 10)
    await batcher.close()


async def test_rows_are_capped_by_the_model_limit(pool: ThreadPoolExecutor) -> None:
    batcher = _batcher(pool, Recorder(), model_rows=8, max_batch_size=64)
    assert batcher.register("other", Recorder(), 8) == 8
    assert batcher.register("third", Recorder(), 100) == 64


async def test_batches_of_one_model_run_concurrently(pool: ThreadPoolExecutor) -> None:
    gate = threading.Event()
    run = Recorder(gate)
    batcher = _batcher(pool, run, max_batch_size=1, max_queue_delay_s=0.0, concurrent_batches=2)
    calls = [_submit(batcher, i) for i in range(3)]
    await run.wait_started(2)
    assert run.running == 2
    gate.set()
    assert await asyncio.gather(*calls) == [0, 10, 20]
    assert run.peak == 2  # the pool has three threads: the third batch waited for a slot
    await batcher.close()


async def test_different_keys_never_share_a_batch(pool: ThreadPoolExecutor) -> None:
    run = Recorder()
    batcher = _batcher(pool, run, max_queue_delay_s=0.05)
    keys = ["a", "b", "a", None, "b", None]
    await asyncio.gather(*(batcher.submit("m", i, key=k, rows=1) for i, k in enumerate(keys)))
    assert sorted(run.batches) == [[0, 2], [1, 4], [3], [5]]
    await batcher.close()


async def test_one_failing_request_fails_alone(pool: ThreadPoolExecutor) -> None:
    batcher = _batcher(pool, Recorder(), max_queue_delay_s=0.05)
    results = await asyncio.gather(
        *(batcher.submit("m", i, key="k", rows=1) for i in (1, -1, 2)), return_exceptions=True
    )
    assert results[0] == 10 and results[2] == 20
    assert isinstance(results[1], ValueError)
    await batcher.close()


async def test_a_full_queue_refuses_and_recovers(pool: ThreadPoolExecutor) -> None:
    gate = threading.Event()
    run = Recorder(gate)
    batcher = _batcher(pool, run, max_batch_size=2, max_queue_delay_s=0.0, max_queue_size=3)
    running = _submit(batcher, 0, rows=2)
    await run.wait_started()  # the first batch is taken and blocks in the pool
    queued = [_submit(batcher, i) for i in (1, 2, 3)]
    await _until(lambda: batcher.queued_rows("m") == 3)  # the queue is full
    with pytest.raises(Overloaded) as refused:
        await batcher.submit("m", 4, key="k", rows=1)
    assert refused.value.retry_after_s == 1.0
    gate.set()
    assert await running == 0
    assert await asyncio.gather(*queued) == [10, 20, 30]
    assert await batcher.submit("m", 5, key="k", rows=1) == 50  # serving again
    assert [4] not in run.batches and all(4 not in batch for batch in run.batches)
    await batcher.close()


async def test_a_large_request_enters_an_empty_queue(pool: ThreadPoolExecutor) -> None:
    batcher = _batcher(pool, Recorder(), max_queue_size=2)
    assert await batcher.submit("m", 7, key="k", rows=40) == 70
    await batcher.close()


async def test_a_cancelled_caller_leaves_the_queue(pool: ThreadPoolExecutor) -> None:
    gate = threading.Event()
    run = Recorder(gate)
    batcher = _batcher(pool, run, max_batch_size=1, max_queue_delay_s=0.0, max_queue_size=1)
    first = _submit(batcher, 1)
    await run.wait_started()
    gone = _submit(batcher, 2)
    await _until(lambda: batcher.queued_rows("m") == 1)  # the queue is full
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert batcher.queued_rows("m") == 0
    kept = _submit(batcher, 3)  # fits again
    gate.set()
    assert (await first, await kept) == (10, 30)
    assert [1, 2] not in run.batches and [2] not in run.batches
    await batcher.close()


async def test_a_caller_gone_during_its_batch_does_not_break_it(pool: ThreadPoolExecutor) -> None:
    gate = threading.Event()
    run = Recorder(gate)
    batcher = _batcher(pool, run, max_batch_size=3, max_queue_delay_s=0.0)
    calls = [_submit(batcher, i) for i in range(3)]
    await run.wait_started()  # the three were queued before the scheduler ran: one batch
    calls[1].cancel()
    gate.set()
    assert await calls[0] == 0 and await calls[2] == 20
    assert run.batches == [[0, 1, 2]]
    await batcher.close()


async def test_close_refuses_new_and_queued_requests(pool: ThreadPoolExecutor) -> None:
    gate = threading.Event()
    run = Recorder(gate)
    batcher = _batcher(pool, run, max_batch_size=1, max_queue_delay_s=0.0)
    running = _submit(batcher, 1)
    await run.wait_started()
    queued = _submit(batcher, 2)
    await _until(lambda: batcher.queued_rows("m") == 1)  # waits for the only batch slot
    closing = asyncio.ensure_future(batcher.close())
    await asyncio.sleep(0)  # the close task runs up to its first await: no batch may start
    gate.set()
    await closing
    assert await running == 10  # the running batch finished
    with pytest.raises(Unavailable):
        await queued
    with pytest.raises(Unavailable):
        await batcher.submit("m", 3, key="k", rows=1)


# --- the real back stages ---------------------------------------------------------------------


def _stages(deployment: Deployment, name: str) -> tuple[FrontStage, BackStage]:
    front = load_front_stages(deployment.layout.public)[name]
    back = load_back_stage(deployment.layout.private.model(name), deployment.provider)
    return front, back


def _back_request(front: FrontStage, back: BackStage, inputs: dict[str, Any]) -> BackRequest:
    """What the private tier receives for ``inputs``: FP16 activations plus forwarded inputs."""
    with torch.inference_mode():
        outputs = front.module(*(torch.from_numpy(inputs[s.name]) for s in front.manifest.inputs))
    arrays = {
        spec.name: tensor.numpy().astype(np.float16)
        for spec, tensor in zip(front.manifest.outputs, outputs, strict=True)
    }
    arrays.update({name: inputs[name] for name in front.manifest.forward_inputs})
    sizes = {"batch": len(next(iter(arrays.values())))}
    for spec in back.manifest.inputs:
        for dim, size in zip(spec.shape, arrays[spec.name].shape, strict=True):
            if not isinstance(dim, int):
                sizes[dim.name] = size
    return BackRequest(arrays, sizes, sizes["batch"], top_k=0)


def _raw(back: BackStage, plan: BatchPlan, requests: list[BackRequest]) -> list[torch.Tensor]:
    output = forward(back, assemble(back.manifest, [r.arrays for r in requests]))
    rows, start = [], 0
    for request in requests:
        rows.append(
            unpad(
                output[start : start + request.rows], back.manifest.outputs[0], plan, request.sizes
            )
        )
        start += request.rows
    return rows


@pytest.fixture(scope="module")
def digits_stages(deployment: Deployment) -> tuple[FrontStage, BackStage]:
    return _stages(deployment, "digits")


@pytest.fixture(scope="module")
def minilm_stages(deployment: Deployment) -> tuple[FrontStage, BackStage]:
    return _stages(deployment, "minilm")


def test_digits_batched_equals_unbatched(
    digits_stages: tuple[FrontStage, BackStage], digits_model: DigitsFixture
) -> None:
    front, back = digits_stages
    plan = plan_batching(back, pad=True)
    assert plan == BatchPlan(batchable=True)
    x, starts = digits_model.data.test_x, np.cumsum([0, 1, 3, 7, 1, 16, 2, 5])
    requests = [
        _back_request(front, back, {"image": x[a:b]}) for a, b in itertools.pairwise(starts)
    ]
    together = _raw(back, plan, requests)
    alone = [_raw(back, plan, [request])[0] for request in requests]
    for batched, raw in zip(together, alone, strict=True):
        torch.testing.assert_close(batched, raw, atol=1e-5, rtol=0)
    answers = run_batch(back, plan, requests)
    for answer, request in zip(answers, requests, strict=True):
        assert not isinstance(answer, Exception)
        (single,) = run_batch(back, plan, [request])
        assert not isinstance(single, Exception)
        np.testing.assert_array_equal(answer[INDICES], single[INDICES])
        np.testing.assert_allclose(answer[SCORES], single[SCORES], atol=1e-4 + 1e-12)  # 4 dp


def test_minilm_pads_sequences_and_equals_unbatched(
    minilm_stages: tuple[FrontStage, BackStage],
) -> None:
    front, back = minilm_stages
    plan = plan_batching(back, pad=True)
    assert plan.padded == frozenset({"seq"})
    groups = [minilm.SENTENCES[:1], minilm.SENTENCES[2:4], minilm.SENTENCES, ["Short."]]
    requests = []
    for sentences in groups:
        tokens = {name: t.numpy() for name, t in minilm.tokenize(sentences).items()}
        requests.append(_back_request(front, back, tokens))
    assert len({r.arrays["attention_mask"].shape[1] for r in requests}) > 2  # lengths differ
    together = _raw(back, plan, requests)
    for request, batched in zip(requests, together, strict=True):
        torch.testing.assert_close(batched, _raw(back, plan, [request])[0], atol=1e-5, rtol=0)
    for request, answer in zip(requests, run_batch(back, plan, requests), strict=True):
        (single,) = run_batch(back, plan, [request])
        assert not isinstance(answer, Exception) and not isinstance(single, Exception)
        np.testing.assert_allclose(answer[EMBEDDING], single[EMBEDDING], atol=1e-5 + 1e-12)


class _UnmaskedMean(torch.nn.Module):
    """A back stage that ignores the mask: zero padding changes its answer."""

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return hidden.mean(dim=1)


def test_padding_is_refused_when_it_changes_answers(
    minilm_stages: tuple[FrontStage, BackStage],
) -> None:
    _, back = minilm_stages
    unmasked = BackStage(back.config, back.manifest, _UnmaskedMean())
    assert plan_batching(unmasked, pad=True) == BatchPlan(batchable=True)
    assert plan_batching(back, pad=False) == BatchPlan(batchable=True)
    assert BatchPlan(batchable=True).key(back.manifest.inputs, _seq_arrays(5)) != BatchPlan(
        batchable=True
    ).key(back.manifest.inputs, _seq_arrays(6))
    padded = BatchPlan(batchable=True, padded=frozenset({"seq"}))
    assert padded.key(back.manifest.inputs, _seq_arrays(5)) == padded.key(
        back.manifest.inputs, _seq_arrays(6)
    )


class _Picky(torch.nn.Module):
    """A back stage that refuses any batch holding a very negative activation."""

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if bool((hidden < -100).any()):
            raise ValueError("refused")
        return hidden.mean(dim=1)


def test_a_request_that_breaks_its_batch_fails_alone(
    minilm_stages: tuple[FrontStage, BackStage],
) -> None:
    _, back = minilm_stages
    picky = BackStage(back.config, back.manifest, _Picky())
    plan = BatchPlan(batchable=True, padded=frozenset({"seq"}))
    requests = [BackRequest(_seq_arrays(n), {"batch": 1, "seq": n}, 1, 0) for n in (3, 5, 4)]
    requests[1].arrays["layer_norm_4"][0, 0, 0] = -1000
    good, bad, other = run_batch(picky, plan, requests)
    assert isinstance(bad, ValueError)
    assert not isinstance(good, Exception) and good[EMBEDDING].shape == (1, 384)
    assert not isinstance(other, Exception) and other[EMBEDDING].shape == (1, 384)


def _seq_arrays(seq: int) -> dict[str, Any]:
    return {
        "layer_norm_4": np.zeros((1, seq, 384), np.float16),
        "attention_mask": np.ones((1, seq), np.int64),
    }


def test_message_limit_fits_the_largest_request(
    minilm_stages: tuple[FrontStage, BackStage], digits_stages: tuple[FrontStage, BackStage]
) -> None:
    _, back = minilm_stages
    needed, model = request_bytes_limit({"digits": digits_stages[1], "minilm": back})
    assert model == "minilm"
    per_row = 512 * 384 * 4 + 512 * 8  # FP32 hidden states at the longest sequence, INT64 mask
    assert needed >= back.config.max_batch_size * per_row
    assert message_limit(4 * 1024 * 1024, {"minilm": back}) == needed
    assert message_limit(needed + 1, {"minilm": back}) == needed + 1


async def test_runner_batches_concurrent_requests(
    digits_stages: tuple[FrontStage, BackStage], digits_model: DigitsFixture
) -> None:
    front, back = digits_stages
    metrics = PrivateMetrics.create(["digits"])
    with ThreadPoolExecutor(2) as pool:
        batcher = DynamicBatcher[BackRequest, dict[str, Any]](
            pool,
            BatchSettings(max_queue_delay_s=0.05),
            lambda model, rows, _s: metrics.observe_batch(model, rows),
        )
        runner = BackStageRunner(ModelStore(loaded={"digits": back}), batcher)
        images = [digits_model.data.test_x[i : i + 1 + i % 3] for i in range(12)]
        requests = [_infer_request(front, back, {"image": x}) for x in images]
        replies = await asyncio.gather(*(runner.infer(r) for r in requests))
        singles = [await runner.infer(r) for r in requests]
        await batcher.close()
    for reply, single in zip(replies, singles, strict=True):
        assert [t.data for t in reply.outputs if t.name == INDICES] == [
            t.data for t in single.outputs if t.name == INDICES
        ]
    body = metrics.render()[0].decode()
    samples = {
        (s.name, s.labels.get("le")): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
        if s.labels.get("model") == "digits"
    }
    assert samples[("splitvault_private_batch_size_count", None)] == 1 + len(requests)
    assert samples[("splitvault_private_batch_size_sum", None)] == 2 * sum(map(len, images))


def _infer_request(
    front: FrontStage, back: BackStage, inputs: dict[str, Any]
) -> inference_pb2.InferRequest:
    request = _back_request(front, back, inputs)
    return inference_pb2.InferRequest(
        model=back.config.name,
        inputs=[to_proto(name, array) for name, array in request.arrays.items()],
    )


async def test_a_lone_batch_runs_on_every_core_and_a_shared_one_on_the_loaded_count(
    pool: ThreadPoolExecutor,
) -> None:
    threads = ComputeThreads(alone=2, loaded=1)
    seen: list[int] = []

    def run(payloads: list[int]) -> list[int | Exception]:
        seen.append(torch.get_num_threads())
        return list(payloads)

    waits: list[tuple[str, float]] = []
    batcher: DynamicBatcher[int, int] = DynamicBatcher(
        pool,
        BatchSettings(max_queue_delay_s=0.2),
        threads=threads,
        observe_wait=lambda model, seconds: waits.append((model, seconds)),
    )
    batcher.register("m", run, 64)
    assert await batcher.submit("m", 1, key="k", rows=1) == 1  # alone: every core
    # Two queued before the scheduler runs share one batch: the loaded count.
    assert await asyncio.gather(*(batcher.submit("m", i, key="k", rows=1) for i in (2, 3))) == [
        2,
        3,
    ]
    assert seen == [2, 1]
    assert [model for model, _ in waits] == ["m"] * 3  # each request's queue wait, once
    assert all(seconds >= 0 for _, seconds in waits)
    await batcher.close()
