"""``InferBatch``: the public tier sends the requests it has ready at one moment in one call,
and the private tier answers each exactly as it would have answered it alone.

Real processes and real mutual TLS: a copy of the session deployment (digits models), one
private tier with small daily budgets, one public tier (replica 2's certificate). The direct
calls are what the owner of a public host can make with a replica's certificate: a batch
call gets no more from the private tier than the same requests sent one by one.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import torch

from protos import inference_pb2, inference_pb2_grpc
from shared.batch_rpc import MAX_REQUESTS
from shared.layout import FRONT_FILE, DeployLayout
from shared.manifest import DimSpec, read_manifest
from shared.tensor_codec import to_proto
from splitvault.deploy import add_public_replica, load_ca
from tests.conftest import Deployment, DigitsFixture, issue_key
from tests.support.deployments import copy_deployment, pairing_id
from tests.support.processes import TierProcess, start_private, start_public
from tests.support.stack import https, image_request, poll, private_channel, tier_env

pytestmark = pytest.mark.slow

UNSIGNED_BUDGET, ROWS = 200, 10


def _budget(daily: int) -> str:
    return json.dumps({"rate_per_s": 1e6, "burst": 1000, "daily_budget": daily})


PRIVATE_ENV = {
    **tier_env(),
    "SPLITVAULT_PRIVATE_ADMISSION__UNSIGNED": _budget(UNSIGNED_BUDGET),
}


@dataclass
class Stack:
    """The module's tiers and the client certificate folders of replicas 1, 2 and 3."""

    layout: DeployLayout
    private: TierProcess
    public: TierProcess
    key: str
    folders: dict[int, Path]
    channels: list[grpc.Channel]

    def stub(self, replica: int, port: int | None = None) -> Any:
        """A direct caller of the private tier with replica ``replica``'s certificate."""
        port = port or self.private.port
        self.channels.append(private_channel(self.layout, port, self.folders[replica]))
        return inference_pb2_grpc.PrivateInferenceStub(self.channels[-1])


@pytest.fixture(scope="module")
def stack(deployment: Deployment, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    layout = copy_deployment(
        deployment.layout,
        tmp_path_factory.mktemp("batchrpc") / "d",
        skip_models={"minilm", "nested"},
        keep_public_state=False,
    )
    ca = load_ca(layout)
    folders = {1: layout.public.tls, 2: add_public_replica(layout, ca)[1]}
    folders[3] = add_public_replica(layout, ca)[1]
    key = issue_key(layout, "batchrpc")
    private = start_private(layout.root, env=PRIVATE_ENV)
    env = {**tier_env(), "SPLITVAULT_PUBLIC_CLIENT_TLS_DIR": str(folders[2])}
    try:
        public = start_public(layout.root, private.port, env=env)
    except BaseException:
        private.stop()
        raise
    built = Stack(layout, private, public, key, folders, [])
    try:
        yield built
    finally:
        for channel in built.channels:
            channel.close()
        public.stop()
        private.stop()


def _request(layout: DeployLayout, model: str, rows: int, seed: int, **extra: Any) -> Any:
    """``rows`` rows of chosen activations for ``model``'s back stage, as an attacker sends."""
    (spec,) = read_manifest(layout.private.model(model)).inputs
    shape = [rows if isinstance(dim, DimSpec) else dim for dim in spec.shape]
    array = np.abs(np.random.default_rng(seed).standard_normal(shape))
    array = array.astype(extra.pop("dtype", np.float16))
    if "poison" in extra:
        array.flat[3] = extra.pop("poison")
    return inference_pb2.InferRequest(
        model=model,
        inputs=[to_proto(spec.name, array)],
        pairing_id=extra.pop("pairing", None) or pairing_id(layout, model),
        **extra,
    )


def _batch(stub: Any, requests: list[Any]) -> list[list[Any]]:
    """The replies of one InferBatch call, each as its list of results."""
    call = stub.InferBatch(inference_pb2.InferBatchRequest(requests=requests), timeout=60)
    return [list(reply.results) for reply in call]


def _alone(stub: Any, request: Any) -> tuple[str, Any]:
    """What ``Infer`` gives for ``request``: ("ok", outputs) or ("error", (code, details,
    reason trailer))."""
    try:
        reply = stub.Infer(request, timeout=60)
    except grpc.RpcError as error:
        metadata: Any = error.trailing_metadata() or ()
        trailers = {str(key): str(value) for key, value in metadata}
        return "error", (error.code().value[0], error.details(), trailers.get("splitvault-reason"))
    return "ok", list(reply.outputs)


def _in_batch(result: Any) -> tuple[str, Any]:
    if result.HasField("response"):
        return "ok", list(result.response.outputs)
    status = result.error
    return "error", (status.code, status.message, status.trailers.get("splitvault-reason"))


def test_each_request_of_a_batch_is_answered_or_refused_as_it_would_be_alone(
    stack: Stack,
) -> None:
    layout = stack.layout
    requests = [
        _request(layout, "digits", 2, 1, key_id="a"),
        _request(layout, "digits", 2, 2, poison=np.nan),
        _request(layout, "digits", 2, 3, dtype=np.float64),
        _request(layout, "digits", 2, 4, pairing="0" * 32),
        inference_pb2.InferRequest(model="no-such-model"),
        _request(layout, "digits-label", 3, 6, dtype=np.float32, key_id="b"),
        _request(layout, "digits", 0, 7),
    ]
    stub = stack.stub(3)
    results = [result for reply in _batch(stub, requests) for result in reply]
    assert sorted(result.index for result in results) == list(range(len(requests)))
    by_index = {result.index: _in_batch(result) for result in results}
    alone = [_alone(stub, request) for request in requests]
    assert [by_index[i] for i in range(len(requests))] == alone
    kinds = [kind for kind, _ in alone]
    assert kinds[0] == kinds[5] == "ok" and kinds[1:5] == ["error"] * 4, alone


def test_a_batch_call_counts_every_request_against_the_identity_budget(stack: Stack) -> None:
    """25 requests of 10 rows against replica 1's unsigned budget of 200 samples: 20 are
    answered and 5 refused with the identity's budget, in one call as they would be in 25."""
    stub = stack.stub(1)
    requests = [_request(stack.layout, "digits", ROWS, 100 + i) for i in range(25)]
    results = [result for reply in _batch(stub, requests) for result in reply]
    answered = [r for r in results if r.HasField("response")]
    refused = [r.error for r in results if r.HasField("error")]
    assert len(answered) * ROWS == UNSIGNED_BUDGET
    assert {(s.code, s.trailers["splitvault-reason"]) for s in refused} == {
        (grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], "identity_budget")
    }
    assert len(refused) == 5
    kind, (code, _, reason) = _alone(stub, requests[0])  # and the budget stays spent
    exhausted = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert (kind, code, reason) == ("error", exhausted, "identity_budget")


def test_a_batch_over_the_request_limit_is_refused_whole(stack: Stack) -> None:
    request = _request(stack.layout, "digits", 1, 9)
    with pytest.raises(grpc.RpcError) as refused:
        _batch(stack.stub(3), [request] * (MAX_REQUESTS + 1))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"at most {MAX_REQUESTS}" in (refused.value.details() or "")


def _batch_calls(private: TierProcess) -> tuple[float, float]:
    """(InferBatch calls, requests in them) from the private tier's metrics."""
    text = httpx.get(private.metrics_url, timeout=10).text
    values = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in text.splitlines()
        if line.startswith("splitvault_private_batch_call_requests_")
    }
    return (
        values.get("splitvault_private_batch_call_requests_count", 0.0),
        values.get("splitvault_private_batch_call_requests_sum", 0.0),
    )


def test_concurrent_requests_through_the_public_tier_share_calls_and_keep_their_answers(
    stack: Stack, digits_model: DigitsFixture
) -> None:
    """32 clients at once, one held-out digit each: the public tier sends them in batch calls,
    and each client gets the answer it gets alone (a mix-up of results would show)."""
    images = np.asarray(digits_model.data.test_x[:32])
    with https(stack.layout, stack.public.port, stack.key) as http:
        alone = [
            http.post("/v2/models/digits/infer", json=image_request(images[i : i + 1])).json()
            for i in range(len(images))
        ]
    calls_before, requests_before = _batch_calls(stack.private)

    def one(i: int) -> Any:
        with https(stack.layout, stack.public.port, stack.key) as http:
            reply = http.post("/v2/models/digits/infer", json=image_request(images[i : i + 1]))
        assert reply.status_code == 200, reply.text
        return reply.json()

    for _ in range(5):  # until the public tier has sent at least one batch call
        with ThreadPoolExecutor(len(images)) as pool:
            together = list(pool.map(one, range(len(images))))
        strip = [{**body, "id": None} for body in together]
        assert strip == [{**body, "id": None} for body in alone]
        calls, requests = _batch_calls(stack.private)
        if calls > calls_before:
            break
    assert calls > calls_before, "32 concurrent requests never shared a call"
    assert requests - requests_before >= 2 * (calls - calls_before)  # several per call


def _front(layout: DeployLayout) -> torch.nn.Module:
    return torch.export.load(str(layout.public.model("digits") / FRONT_FILE)).module()


def test_a_throttled_request_does_not_hold_its_neighbours(
    stack: Stack,
    deployment: Deployment,
    digits_model: DigitsFixture,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """A second private tier with the monitor throttling: once a key's stream of noise is at
    the refused level, a batch with that key's request and a natural one returns the natural
    answer in an earlier reply than the throttled one."""
    env = {
        **PRIVATE_ENV,
        "SPLITVAULT_PRIVATE_ACTIVATION_MONITOR__ACTION": "throttle",
        "SPLITVAULT_PRIVATE_ACTIVATION_MONITOR__THROTTLE_DELAY_S": "3",
        "SPLITVAULT_PRIVATE_ADMISSION__UNSIGNED": _budget(100_000),
    }
    layout = copy_deployment(
        deployment.layout,
        tmp_path_factory.mktemp("batchrpc-throttle") / "d",
        skip_models={"minilm", "nested"},
        keep_public_state=False,
    )
    private = start_private(layout.root, env=env)
    try:
        stub = stack.stub(1, port=private.port)  # the same CA: the module's certificates work
        (spec,) = read_manifest(layout.private.model("digits")).inputs

        def refused_level() -> bool:
            return any(
                e.get("event") == "private_monitor_alert"
                and e.get("key_id_asserted") == "noise"
                and e.get("stream_level") == "refuse"
                for e in private.events()
            )

        rng = np.random.default_rng(11)
        shape = [16 if isinstance(dim, DimSpec) else dim for dim in spec.shape]
        for _ in range(64):  # 1,024 samples; refused within 1,000
            noise = rng.uniform(0, 4, shape).astype(np.float16)
            stub.Infer(_with(layout, spec.name, noise, "noise"), timeout=60)
            if refused_level():
                break
        poll(refused_level, "the noise stream at the refused level")
        with torch.inference_mode():
            (natural,) = _front(layout)(torch.from_numpy(digits_model.data.test_x[:1]))
        requests = [
            _with(layout, spec.name, noise[:1], "noise"),
            _with(layout, spec.name, natural.numpy().astype(np.float16), "customer"),
        ]
        replies = _batch(stub, requests)
        assert [[r.index for r in reply] for reply in replies] == [[1], [0]]
        assert all(r.HasField("response") for reply in replies for r in reply)
    finally:
        private.stop()


def _with(layout: DeployLayout, name: str, rows: np.ndarray, key: str) -> Any:
    return inference_pb2.InferRequest(
        model="digits",
        inputs=[to_proto(name, rows)],
        key_id=key,
        pairing_id=pairing_id(layout, "digits"),
    )
