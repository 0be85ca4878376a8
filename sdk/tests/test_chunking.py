"""predict(chunk=...): more rows than a model takes at once, as a series of requests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from splitvault_client import AsyncClient, Client, ModelMetadata, RateLimited, TensorSpec
from splitvault_client._chunking import chunk_size, policy_burst

LIMIT = 64
METADATA = {
    "name": "digits",
    "versions": ["1"],
    "platform": "splitvault",
    "inputs": [{"name": "pixels", "datatype": "FP32", "shape": [-1, 4]}],
    "outputs": [{"name": "classification", "datatype": "BYTES", "shape": [-1, 1]}],
    "parameters": {"task": "classification", "policy": {}, "max_batch_size": LIMIT},
}


class Server:
    """A model server that answers each row with its first value as the class index.

    ``burst``: requests of more rows are refused (429 with ``RateLimit-Policy``, nothing
    counted), as splitvault refuses a request larger than the key's burst. ``refusals``: the
    Retry-After of a rate-limit refusal for each infer request, in order (``None``: answer).
    """

    def __init__(self, burst: int | None = None, refusals: list[str | None] | None = None) -> None:
        self.burst = burst
        self.refusals = list(refusals or [])
        self.infers: list[tuple[int, httpx.Request]] = []  # (status, request)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v2/models/digits":
            return httpx.Response(200, json=METADATA)
        (tensor,) = json.loads(request.content)["inputs"]
        rows = tensor["shape"][0]
        policy = {} if self.burst is None else {"RateLimit-Policy": f'"burst";q={self.burst};w=9'}
        status, headers = 200, dict(policy)
        refusal = self.refusals.pop(0) if self.refusals else None
        if self.burst is not None and rows > self.burst:
            status = 429
        elif refusal is not None:
            status, headers = 429, {**policy, "Retry-After": refusal}
        self.infers.append((status, request))
        if status != 200:
            return httpx.Response(status, json={"error": "rate limit exceeded"}, headers=headers)
        firsts = np.asarray(tensor["data"], dtype=np.float32).reshape(rows, 4)[:, 0]
        data = [f"0.5:{int(v)}:c{int(v)}" for v in firsts]
        output = {"name": "classification", "datatype": "BYTES", "shape": [rows, 1], "data": data}
        body = {"model_name": "digits", "id": json.loads(request.content).get("id")}
        return httpx.Response(200, json=body | {"outputs": [output]}, headers=headers)

    def rows_sent(self) -> list[int]:
        return [json.loads(r.content)["inputs"][0]["shape"][0] for _, r in self.infers]

    def client(self, **kwargs: Any) -> Client:
        return Client("http://localhost", transport=httpx.MockTransport(self), **kwargs)


def rows(n: int) -> np.ndarray:
    """``n`` float64 rows (NumPy's default) whose first value is the row number."""
    x = np.zeros((n, 4))
    x[:, 0] = np.arange(n)
    return x


def metadata(limit: int | None) -> ModelMetadata:
    spec = (TensorSpec("pixels", "FP32", (-1, 4)),)
    return ModelMetadata("digits", (), "", spec, (), "classification", {}, None, {}, limit)


def test_chunk_sizes() -> None:
    arrays = {"pixels": rows(200)}
    assert chunk_size(metadata(64), {"pixels": rows(64)}, False) is None
    assert chunk_size(metadata(64), arrays, True) == 64
    assert chunk_size(metadata(64), arrays, 100) == 64  # never past the model's limit
    assert chunk_size(metadata(64), arrays, 50) == 50
    assert chunk_size(metadata(None), arrays, 50) == 50
    assert chunk_size(metadata(None), arrays, False) is None  # the server will judge
    assert chunk_size(metadata(256), arrays, True) is None  # fits in one request
    with pytest.raises(
        ValueError, match=r"200 rows are more than model 'digits' takes in one request \(64\)"
    ) as caught:
        chunk_size(metadata(64), arrays, False)
    assert "pass chunk=True to send them as 4 requests" in str(caught.value)
    with pytest.raises(ValueError, match="pass chunk=N"):
        chunk_size(metadata(None), arrays, True)
    for bad in (0, -3, 2.5, "yes"):
        with pytest.raises(ValueError, match="positive row count"):
            chunk_size(metadata(64), arrays, bad)  # type: ignore[arg-type]


def test_policy_burst_reads_the_ratelimit_policy_header() -> None:
    assert policy_burst({"RateLimit-Policy": '"burst";q=128;w=7, "daily";q=9;w=86400'}) == 128
    assert policy_burst({"RateLimit-Policy": '"daily";q=9;w=86400'}) is None
    assert policy_burst({}) is None


def test_more_rows_than_the_model_takes_go_in_chunks_and_come_back_in_order() -> None:
    server = Server()
    with server.client() as client:
        prediction = client.predict("digits", rows(200), chunk=True, request_id="r")
    assert server.rows_sent() == [64, 64, 64, 8]
    assert [json.loads(r.content)["id"] for _, r in server.infers] == ["r-0", "r-1", "r-2", "r-3"]
    assert prediction.id == "r" and prediction.indices is not None
    assert prediction.indices[:, 0].tolist() == list(range(200))
    assert prediction.labels is not None and prediction.labels[199] == ["c199"]
    assert prediction.raw["outputs"][0]["shape"] == [200, 1]


def test_without_chunk_too_many_rows_are_refused_before_sending() -> None:
    server = Server()
    with server.client() as client, pytest.raises(ValueError, match="pass chunk=True"):
        client.predict("digits", rows(65))
    assert server.infers == []


def test_chunks_shrink_to_the_keys_burst() -> None:
    server = Server(burst=20)
    with server.client() as client:
        prediction = client.predict("digits", rows(100), chunk=True)
    # The first chunk is refused before anything runs; every later one fits the burst.
    assert server.rows_sent() == [64, 20, 20, 20, 20, 20]
    assert [status for status, _ in server.infers] == [429, 200, 200, 200, 200, 200]
    assert prediction.indices is not None
    assert prediction.indices[:, 0].tolist() == list(range(100))


def test_a_burst_announced_by_an_answer_shrinks_the_next_chunks() -> None:
    server = Server()  # admits anything, but says its burst is 50 on every answer

    def announce(request: httpx.Request) -> httpx.Response:
        response = server(request)
        response.headers["RateLimit-Policy"] = '"burst";q=50;w=5'
        return response

    with Client("http://localhost", transport=httpx.MockTransport(announce)) as client:
        client.predict("digits", rows(160), chunk=True)
    assert server.rows_sent() == [64, 50, 46]


def test_a_rate_limited_chunk_is_sent_again_after_retry_after() -> None:
    server = Server(refusals=[None, "0", None])
    with server.client() as client:
        prediction = client.predict("digits", rows(150), chunk=True)
    assert server.rows_sent() == [64, 64, 64, 22]  # the second chunk twice
    assert [status for status, _ in server.infers] == [200, 429, 200, 200]
    assert prediction.indices is not None
    assert prediction.indices[:, 0].tolist() == list(range(150))


def test_a_wait_longer_than_max_backoff_raises_saying_how_far_it_got() -> None:
    server = Server(refusals=[None, "3600"])  # a daily quota
    with server.client() as client, pytest.raises(RateLimited) as caught:
        client.predict("digits", rows(150), chunk=True)
    assert caught.value.retry_after == 3600
    assert caught.value.__notes__ == ["64 of 150 rows had been answered"]
    assert len(server.infers) == 2


def test_each_chunk_is_signed_on_its_own(tmp_path: Path) -> None:
    from http_message_signatures import ContentDigest

    from splitvault_client import create_signing_key

    key = tmp_path / "key.json"
    create_signing_key(key, key_id="k_0123abcd", deployment="d1")
    server = Server()
    with server.client(signing_key=key) as client:
        client.predict("digits", rows(100), chunk=True, top_k=1)
    nonces = set()
    for (_, request), n in zip(server.infers, (64, 36), strict=True):
        ContentDigest.verify(request.headers["content-digest"], request.content)
        assert f"rows={n}" in request.headers["splitvault-claims"]
        assert f'shapes=("pixels:{n}x4")' in request.headers["splitvault-claims"]
        nonces.add(request.headers["signature-input"])
    assert len(nonces) == 2


@pytest.mark.asyncio
async def test_the_async_client_chunks_too() -> None:
    server = Server(burst=30)
    transport = httpx.MockTransport(server)
    async with AsyncClient("http://localhost", transport=transport) as client:
        prediction = await client.predict("digits", rows(70), chunk=40)
    assert server.rows_sent() == [40, 30, 30, 10]
    assert prediction.indices is not None
    assert prediction.indices[:, 0].tolist() == list(range(70))
