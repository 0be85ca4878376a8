"""The public tier's private-tier client: which requests share a call, and that every caller
gets exactly one outcome whatever the call does.

The stub below stands in for the private tier only to produce what a correct private tier
never sends (missing, repeated or foreign results, a call that breaks half-way) and to see
what was sent; the real tiers are in tests/integration/test_infer_batch.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest

from protos import inference_pb2
from public_api.private_client import PrivateTierClient
from shared.errors import InternalError, Unavailable

Reply = inference_pb2.InferBatchReply


def _request(n: int) -> inference_pb2.InferRequest:
    return inference_pb2.InferRequest(model="m", request_id=str(n))


def _answer(index: int, request_id: str) -> inference_pb2.InferResult:
    response = inference_pb2.InferResponse(model="m", policy=request_id)
    return inference_pb2.InferResult(index=index, response=response)


class Stub:
    """Records the calls; ``batch_replies`` decides what an InferBatch call streams back."""

    def __init__(self, batch_replies: Callable[[list[Any]], AsyncIterator[Reply]]) -> None:
        self.calls: list[tuple[str, list[str]]] = []
        self.cancelled = asyncio.Event()
        self._replies = batch_replies

    async def Infer(self, request: Any, timeout: float) -> inference_pb2.InferResponse:
        self.calls.append(("Infer", [request.request_id]))
        try:
            await asyncio.sleep(0.05)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return inference_pb2.InferResponse(model="m", policy=request.request_id)

    def InferBatch(self, batch: Any, timeout: float) -> AsyncIterator[Reply]:
        self.calls.append(("InferBatch", [r.request_id for r in batch.requests]))
        return self._watched(self._replies(list(batch.requests)))

    async def _watched(self, replies: AsyncIterator[Reply]) -> AsyncIterator[Reply]:
        try:
            async for reply in replies:
                yield reply
        except (asyncio.CancelledError, GeneratorExit):
            self.cancelled.set()
            raise


class Channel:
    async def close(self, grace: float | None = None) -> None:
        return None


def _client(stub: Stub) -> PrivateTierClient:
    """A client whose channel is ``stub`` (its constructor dials a real private tier)."""
    client = PrivateTierClient.__new__(PrivateTierClient)
    client._stub = stub  # type: ignore[assignment]
    client._channel = Channel()  # type: ignore[assignment]
    client._timeout, client._limit = 5.0, 4 * 1024 * 1024
    client._pending, client._calls = None, set()
    return client


async def _all_at_once(requests: list[Any]) -> AsyncIterator[Reply]:
    yield Reply(results=[_answer(i, r.request_id) for i, r in enumerate(requests)])


async def _outcomes(client: PrivateTierClient, n: int) -> list[Any]:
    calls = [client.infer(_request(i)) for i in range(n)]
    return list(await asyncio.gather(*calls, return_exceptions=True))


def test_a_lone_request_goes_as_infer_and_requests_ready_together_share_one_call() -> None:
    async def scenario() -> tuple[Stub, list[Any], list[Any]]:
        stub = Stub(_all_at_once)
        client = _client(stub)
        lone = await _outcomes(client, 1)
        together = await _outcomes(client, 5)
        return stub, lone, together

    stub, lone, together = asyncio.run(scenario())
    assert stub.calls == [("Infer", ["0"]), ("InferBatch", ["0", "1", "2", "3", "4"])]
    assert [r.policy for r in lone] == ["0"]
    assert [r.policy for r in together] == ["0", "1", "2", "3", "4"]


def test_each_caller_gets_its_own_result_whatever_order_they_come_in() -> None:
    async def reversed_in_two(requests: list[Any]) -> AsyncIterator[Reply]:
        answers = [_answer(i, r.request_id) for i, r in enumerate(requests)][::-1]
        yield Reply(results=answers[:2])
        yield Reply(results=answers[2:])

    outcomes = asyncio.run(_outcomes(_client(Stub(reversed_in_two)), 4))
    assert [r.policy for r in outcomes] == ["0", "1", "2", "3"]


def test_repeated_foreign_and_missing_results_never_leave_a_caller_waiting() -> None:
    async def odd(requests: list[Any]) -> AsyncIterator[Reply]:
        yield Reply(results=[_answer(0, "0"), _answer(0, "again"), _answer(9, "foreign")])
        yield Reply(results=[_answer(2, "2")])  # 1 never comes

    outcomes = asyncio.run(_outcomes(_client(Stub(odd)), 3))
    assert outcomes[0].policy == "0" and outcomes[2].policy == "2"
    assert isinstance(outcomes[1], InternalError)
    assert outcomes[1].message == "internal error"  # nothing of the call's internals


def test_a_call_that_breaks_half_way_fails_only_the_requests_left() -> None:
    async def breaks(requests: list[Any]) -> AsyncIterator[Reply]:
        yield Reply(results=[_answer(0, "0")])
        metadata = grpc.aio.Metadata()
        raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, metadata, metadata, "gone", None)

    outcomes = asyncio.run(_outcomes(_client(Stub(breaks)), 3))
    assert outcomes[0].policy == "0"
    assert all(isinstance(outcome, Unavailable) for outcome in outcomes[1:])


def test_a_request_whose_caller_left_before_the_send_is_not_sent() -> None:
    async def scenario() -> tuple[Stub, list[Any]]:
        stub = Stub(_all_at_once)
        client = _client(stub)
        tasks = [asyncio.ensure_future(client.infer(_request(i))) for i in range(3)]
        await asyncio.sleep(0)  # each has queued its request; the send is the next turn
        tasks[1].cancel()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        return stub, outcomes

    stub, outcomes = asyncio.run(scenario())
    assert stub.calls == [("InferBatch", ["0", "2"])]
    assert outcomes[0].policy == "0" and outcomes[2].policy == "2"
    assert isinstance(outcomes[1], asyncio.CancelledError)


@pytest.mark.parametrize("callers", [1, 3], ids=["infer", "batch"])
def test_a_call_whose_callers_all_left_is_cancelled(callers: int) -> None:
    async def never(requests: list[Any]) -> AsyncIterator[Reply]:
        await asyncio.sleep(30)
        yield Reply()

    async def scenario() -> bool:
        stub = Stub(never)
        client = _client(stub)
        tasks = [asyncio.ensure_future(client.infer(_request(i))) for i in range(callers)]
        await asyncio.sleep(0.01)  # sent
        for task in tasks:
            task.cancel()
        await asyncio.wait_for(stub.cancelled.wait(), timeout=5)
        return stub.cancelled.is_set()

    assert asyncio.run(scenario())


def test_closing_the_client_answers_every_waiting_caller() -> None:
    async def never(requests: list[Any]) -> AsyncIterator[Reply]:
        await asyncio.sleep(30)
        yield Reply()

    async def scenario() -> list[Any]:
        client = _client(Stub(never))
        sent = [asyncio.ensure_future(client.infer(_request(i))) for i in range(2)]
        await asyncio.sleep(0.01)
        queued = asyncio.ensure_future(client.infer(_request(9)))  # not sent yet
        await asyncio.sleep(0)
        await client.close()
        return list(await asyncio.gather(*sent, queued, return_exceptions=True))

    outcomes = asyncio.run(scenario())
    assert len(outcomes) == 3
    assert all(isinstance(outcome, Unavailable) for outcome in outcomes)
