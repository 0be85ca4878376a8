"""Both clients against a scripted server (httpx.MockTransport) and a real HTTPS server."""

from __future__ import annotations

import http.server
import json
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import trustme

import splitvault_client
from splitvault_client import (
    AsyncClient,
    BadRequest,
    Client,
    Forbidden,
    ModelNotFound,
    RateLimited,
    ServerError,
    SplitVaultClientError,
    Timeout,
    TLSError,
    Unauthorized,
    Unavailable,
)

Answer = httpx.Response | httpx.TransportError | Callable[[httpx.Request], httpx.Response]

METADATA = {
    "name": "digits",
    "versions": ["1"],
    "platform": "splitvault",
    "inputs": [{"name": "pixels", "datatype": "FP32", "shape": [-1, 4]}],
    "outputs": [{"name": "classification", "datatype": "BYTES", "shape": [-1, 2]}],
    "parameters": {"task": "classification", "policy": {"top_k": 2}, "labels": None},
}
CLASSIFICATION = {
    "model_name": "digits",
    "id": "r1",
    "outputs": [
        {
            "name": "classification",
            "datatype": "BYTES",
            "shape": [1, 2],
            "data": ["0.9:3:three", "0.1:8"],
            "parameters": {},
        }
    ],
}
ENC_METADATA = METADATA | {
    "name": "enc",
    "inputs": [{"name": "ids", "datatype": "INT64", "shape": [-1, 2]}],
    "outputs": [{"name": "embedding", "datatype": "FP32", "shape": [-1, 2]}],
    "parameters": {"task": "embedding", "policy": {}, "labels": None},
}
EMBEDDING = {
    "model_name": "enc",
    "outputs": [{"name": "embedding", "datatype": "FP32", "shape": [1, 2], "data": [0.5, -1]}],
}


def ok(body: Any, status: int = 200, **headers: str) -> httpx.Response:
    return httpx.Response(status, json=body, headers=headers)


def fail(status: int, retry_after: str | None = None) -> httpx.Response:
    headers = {} if retry_after is None else {"Retry-After": retry_after}
    return httpx.Response(status, json={"error": f"status {status}"}, headers=headers)


class FakeServer:
    """Answers each path from a script (the last answer repeats) and records every request.

    The metadata of ``digits`` and ``enc`` is served unless ``routes`` says otherwise.
    """

    def __init__(self, routes: dict[str, list[Answer]]) -> None:
        models = {f"/base/v2/models/{doc['name']}": [ok(doc)] for doc in (METADATA, ENC_METADATA)}
        self.routes = {path: list(answers) for path, answers in (models | routes).items()}
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answers = self.routes.get(request.url.path)
        if not answers:
            return fail(404)
        answer = answers.pop(0) if len(answers) > 1 else answers[0]
        if isinstance(answer, httpx.TransportError):
            raise answer
        return answer(request) if callable(answer) else answer

    def paths(self) -> list[str]:
        return [request.url.path for request in self.requests]

    def inferences(self) -> list[httpx.Request]:
        return [request for request in self.requests if request.url.path.endswith("/infer")]

    def client(self, **kwargs: Any) -> Client:
        return Client("http://localhost/base", transport=httpx.MockTransport(self), **kwargs)

    def async_client(self, **kwargs: Any) -> AsyncClient:
        return AsyncClient("http://localhost/base", transport=httpx.MockTransport(self), **kwargs)


def test_all_exports_are_the_public_api() -> None:
    errors = {"SplitVaultClientError", "BadRequest", "Unauthorized", "Forbidden", "ModelNotFound"}
    errors |= {"RateLimited", "Unavailable", "ServerError", "ProtocolError"}
    errors |= {"Timeout", "TLSError", "InsecureTransportWarning"}
    results = {"ModelMetadata", "Prediction", "TensorSpec", "Terms", "TermsAcceptance"}
    results |= {"Embeddings"}
    clients = {"AsyncClient", "Client", "__version__"}
    clients |= {"RequestSigner", "create_signing_key"}
    assert set(splitvault_client.__all__) == errors | results | clients
    assert len(splitvault_client.__all__) == len(errors | results | clients)
    for name in splitvault_client.__all__:
        assert getattr(splitvault_client, name) is not None
    for cls in (BadRequest, Unauthorized, Forbidden, ModelNotFound, RateLimited, ServerError):
        assert issubclass(cls, SplitVaultClientError)
    # A timeout is a kind of "cannot answer now"; a TLS failure is a configuration error.
    assert issubclass(splitvault_client.Timeout, Unavailable)
    assert issubclass(splitvault_client.TLSError, SplitVaultClientError)
    assert not issubclass(splitvault_client.TLSError, Unavailable)


# --- request building ----------------------------------------------------------------------


def test_infer_request_carries_json_body_bearer_and_prefix() -> None:
    server = FakeServer({"/base/v2/models/digits/infer": [ok(CLASSIFICATION)]})
    pixels = np.array([[0, 0.5, 1, 0]], dtype=np.float32)
    with server.client(api_key="secret") as client:
        prediction = client.predict("digits", {"pixels": pixels}, top_k=2, request_id="r1")
    (request,) = server.inferences()
    assert request.method == "POST"
    assert request.headers["Authorization"] == "Bearer secret"
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["User-Agent"].startswith("splitvault-client/")
    assert json.loads(request.content) == {
        "id": "r1",
        "inputs": [{"name": "pixels", "shape": [1, 4], "datatype": "FP32", "data": [0, 0.5, 1, 0]}],
        "parameters": {"classification": 2},
    }
    assert prediction.labels == [["three", None]]
    assert prediction.indices is not None and prediction.indices.tolist() == [[3, 8]]
    assert prediction.scores is not None
    assert prediction.scores[0].tolist() == pytest.approx([0.9, 0.1])


def test_no_authorization_header_without_api_key() -> None:
    server = FakeServer({"/base/v2/health/live": [ok({})]})
    with server.client() as client:
        assert client.live() is True
    assert "Authorization" not in server.requests[0].headers


def test_bare_array_takes_the_input_name_from_cached_metadata() -> None:
    server = FakeServer(
        {
            "/base/v2/models/digits": [ok(METADATA)],
            "/base/v2/models/digits/infer": [ok(CLASSIFICATION)],
        }
    )
    with server.client() as client:
        for _ in range(2):
            client.predict("digits", np.zeros((1, 4), dtype=np.float32))
    assert server.paths() == ["/base/v2/models/digits"] + ["/base/v2/models/digits/infer"] * 2
    assert json.loads(server.requests[1].content)["inputs"][0]["name"] == "pixels"


def test_bare_array_for_a_multi_input_model_is_refused_before_inference() -> None:
    extra = {"name": "mask", "datatype": "BOOL", "shape": [-1, 4]}
    server = FakeServer(
        {"/base/v2/models/digits": [ok(METADATA | {"inputs": [*METADATA["inputs"], extra]})]}
    )
    with server.client() as client, pytest.raises(ValueError, match="pixels, mask"):
        client.predict("digits", np.zeros((1, 4), dtype=np.float32))
    assert server.paths() == ["/base/v2/models/digits"]


def test_terms_are_fetched_and_accepted() -> None:
    server = FakeServer(
        {
            "/base/v1/terms": [ok({"version": "2024-1", "text": "terms", "sha256": "00"})],
            "/base/v1/terms/accept": [ok({"accepted": True, "version": "2024-1"})],
        }
    )
    with server.client(api_key="k") as client:
        terms = client.terms()
        acceptance = client.accept_terms(terms.version)
    assert acceptance.accepted and acceptance.version == "2024-1"
    accept = server.requests[1]
    assert accept.method == "POST" and json.loads(accept.content) == {"version": "2024-1"}


def test_health_answers_are_booleans_and_503_is_not_retried() -> None:
    server = FakeServer(
        {
            "/base/v2/health/ready": [fail(503)],
            "/base/v2/models/digits/ready": [ok({})],
            "/base/v2/models/gone/ready": [fail(404)],
        }
    )
    with server.client(retries=3, backoff=0) as client:
        assert client.ready() is False
        assert client.model_ready("digits") is True
        with pytest.raises(ModelNotFound):
            client.model_ready("gone")
    assert server.paths().count("/base/v2/health/ready") == 1


def test_closed_client_cannot_send() -> None:
    server = FakeServer({"/base/v2/health/live": [ok({})]})
    with server.client() as client:
        client.live()
    with pytest.raises(RuntimeError):
        client.live()


# --- errors and retries --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (400, BadRequest),
        (413, BadRequest),
        (401, Unauthorized),
        (403, Forbidden),
        (404, ModelNotFound),
        (429, RateLimited),
        (503, Unavailable),
        (500, ServerError),
        (504, ServerError),
    ],
)
def test_error_statuses_raise_their_class(status: int, cls: type[SplitVaultClientError]) -> None:
    server = FakeServer({"/base/v2/models/digits/infer": [fail(status, retry_after="3")]})
    with server.client() as client, pytest.raises(cls) as caught:
        client.predict("digits", {"pixels": np.zeros((1, 4), dtype=np.float32)})
    assert type(caught.value) is cls
    assert caught.value.status == status and caught.value.message == f"status {status}"
    assert caught.value.retry_after == 3.0


def test_get_is_retried_after_503_until_it_succeeds() -> None:
    server = FakeServer({"/base/v2/models/digits": [fail(503), fail(503), ok(METADATA)]})
    with server.client(retries=2, backoff=0) as client:
        assert client.model_metadata("digits").name == "digits"
    assert len(server.requests) == 3


def test_retries_run_out_and_the_last_error_is_raised() -> None:
    server = FakeServer({"/base/v2/models/digits": [fail(503), fail(502)]})
    with server.client(retries=1, backoff=0) as client, pytest.raises(ServerError) as caught:
        client.model_metadata("digits")
    assert caught.value.status == 502 and len(server.requests) == 2


def test_infer_is_retried_after_503_and_after_failing_to_connect() -> None:
    refused = httpx.ConnectError("refused")
    infer: list[Answer] = [fail(503), refused, ok(CLASSIFICATION)]
    server = FakeServer({"/base/v2/models/digits/infer": infer})
    with server.client(retries=2, backoff=0) as client:
        client.predict("digits", {"pixels": np.zeros((1, 4), dtype=np.float32)})
    assert len(server.inferences()) == 3


@pytest.mark.parametrize("answer", [fail(500), fail(429), httpx.ReadTimeout("slow")])
def test_infer_is_not_retried_once_it_may_have_run(answer: Answer) -> None:
    server = FakeServer({"/base/v2/models/digits/infer": [answer, ok(CLASSIFICATION)]})
    with server.client(retries=3, backoff=0) as client, pytest.raises(SplitVaultClientError):
        client.predict("digits", {"pixels": np.zeros((1, 4), dtype=np.float32)})
    assert len(server.inferences()) == 1


def test_connection_failure_is_unavailable_with_its_cause() -> None:
    server = FakeServer({"/base/v2/health/live": [httpx.ConnectError("refused")]})
    with server.client() as client, pytest.raises(Unavailable) as caught:
        client.live()
    assert caught.value.status is None and isinstance(caught.value.__cause__, httpx.ConnectError)


def test_retry_waits_for_retry_after_but_not_past_the_cap() -> None:
    server = FakeServer({"/base/v2/health/live": [fail(429, retry_after="0.3"), ok({})]})
    with server.client(retries=1, backoff=0) as client:
        start = time.monotonic()
        assert client.live()
        assert time.monotonic() - start >= 0.3
    server = FakeServer({"/base/v2/models/digits": [fail(503, retry_after="60"), ok(METADATA)]})
    with server.client(retries=1, backoff=0, max_backoff=0.05) as client:
        start = time.monotonic()
        assert client.model_metadata("digits").name == "digits"
        # Does not hang on the 60 s Retry-After: the 0.05 s cap is taken in milliseconds on a
        # mocked transport; 5 s only leaves room for a loaded machine.
        assert time.monotonic() - start < 5


# --- AsyncClient ---------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_async_predicts_with_cached_metadata_and_bearer() -> None:
    server = FakeServer(
        {
            "/base/v2/models/digits": [ok(METADATA)],
            "/base/v2/models/digits/infer": [ok(CLASSIFICATION)],
        }
    )
    async with server.async_client(api_key="k") as client:
        first = await client.predict("digits", np.zeros((1, 4), dtype=np.float32), top_k=2)
        await client.predict("digits", np.zeros((1, 4), dtype=np.float32))
    assert first.labels == [["three", None]]
    assert server.paths().count("/base/v2/models/digits") == 1
    assert all(r.headers["Authorization"] == "Bearer k" for r in server.requests)
    assert json.loads(server.requests[1].content)["parameters"] == {"classification": 2}


@pytest.mark.asyncio
async def test_async_embedding_terms_and_health() -> None:
    server = FakeServer(
        {
            "/base/v2/models/enc/infer": [ok(EMBEDDING)],
            "/base/v2/health/live": [ok({})],
            "/base/v2/health/ready": [fail(503)],
            "/base/v1/terms": [ok({"version": "v", "text": "t", "sha256": "s"})],
            "/base/v1/terms/accept": [fail(403)],
        }
    )
    async with server.async_client() as client:
        prediction = await client.predict("enc", {"ids": np.array([[1, 2]], dtype=np.int64)})
        assert await client.live() and not await client.ready()
        assert (await client.terms()).version == "v"
        with pytest.raises(Forbidden):
            await client.accept_terms("v")
    assert prediction.embeddings is not None and prediction.embeddings.dtype == np.float32
    assert prediction.embeddings.tolist() == [[0.5, -1.0]]
    assert json.loads(server.inferences()[0].content)["inputs"][0]["datatype"] == "INT64"


@pytest.mark.asyncio
async def test_async_retries_and_maps_errors() -> None:
    server = FakeServer(
        {
            "/base/v2/models/digits/infer": [fail(503), ok(CLASSIFICATION)],
            "/base/v2/models/nope": [fail(404)],
            "/base/v2/models/busy": [fail(429, retry_after="2")],
        }
    )
    async with server.async_client(retries=1, backoff=0, max_backoff=0.01) as client:
        await client.predict("digits", {"pixels": np.zeros((1, 4), dtype=np.float32)})
        with pytest.raises(ModelNotFound):
            await client.model_metadata("nope")
        with pytest.raises(RateLimited) as caught:
            await client.model_metadata("busy")
    assert caught.value.retry_after == 2.0
    assert server.paths().count("/base/v2/models/digits/infer") == 2
    assert server.paths().count("/base/v2/models/nope") == 1
    assert server.paths().count("/base/v2/models/busy") == 2


# --- real TLS ------------------------------------------------------------------------------


class _LiveHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        status = 200 if self.path == "/v2/health/live" else 404
        body = b"{}"
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def https_server(ca: trustme.CA, *, require_client_cert: bool = False) -> Iterator[str]:
    """A real HTTPS server on localhost with a certificate issued by ``ca``."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    if require_client_cert:
        ca.configure_trust(context)
        context.verify_mode = ssl.CERT_REQUIRED
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _LiveHandler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def ca(tmp_path: Path) -> tuple[trustme.CA, Path]:
    authority = trustme.CA()
    path = tmp_path / "ca.pem"
    authority.cert_pem.write_to_path(str(path))
    return authority, path


def test_tls_server_is_verified_against_the_given_ca(ca: tuple[trustme.CA, Path]) -> None:
    authority, ca_path = ca
    with https_server(authority) as url:
        with Client(url, ca=ca_path) as client:
            assert client.live() is True
        with Client(url, retries=2) as client, pytest.raises(TLSError) as caught:
            client.live()  # certifi's bundle does not know the test CA: not retried
    assert "certificate" in caught.value.message and "pass ca=" in caught.value.message
    assert isinstance(caught.value.__cause__, httpx.ConnectError)
    assert not isinstance(caught.value, Unavailable)


@pytest.mark.asyncio
async def test_async_tls_server_is_verified_against_the_given_ca(
    ca: tuple[trustme.CA, Path],
) -> None:
    authority, ca_path = ca
    with https_server(authority) as url:
        async with AsyncClient(url, ca=str(ca_path)) as client:
            assert await client.live() is True
        async with AsyncClient(url) as client:
            with pytest.raises(TLSError, match="certificate"):
                await client.live()


def test_client_certificate_is_presented_for_mutual_tls(
    ca: tuple[trustme.CA, Path], tmp_path: Path
) -> None:
    authority, ca_path = ca
    leaf = authority.issue_cert("client.example")
    cert_path, key_path = tmp_path / "client.pem", tmp_path / "client.key"
    leaf.cert_chain_pems[0].write_to_path(str(cert_path))
    leaf.private_key_pem.write_to_path(str(key_path))
    with https_server(authority, require_client_cert=True) as url:
        with Client(url, ca=ca_path, cert=(cert_path, key_path)) as client:
            assert client.live() is True
        with Client(url, ca=ca_path) as client, pytest.raises(TLSError, match="pass cert="):
            client.live()


def test_a_server_that_accepts_and_never_answers_is_a_timeout() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:  # the kernel accepts; no reply
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        with Client(url, timeout=0.2) as client, pytest.raises(Timeout) as caught:
            client.live()
    assert caught.value.message == (
        "127.0.0.1 sent no answer within 0.2 s (it may still be working); "
        "Client(timeout=...) sets the limit"
    )
    assert isinstance(caught.value, Unavailable) and isinstance(
        caught.value.__cause__, httpx.ReadTimeout
    )


@pytest.mark.asyncio
async def test_async_timeouts_are_timeouts_too() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        async with AsyncClient(url, timeout=0.2) as client:
            with pytest.raises(Timeout, match=r"sent no answer within 0\.2 s"):
                await client.ready()


# --- request signing -----------------------------------------------------------------------


def test_a_signing_client_signs_each_try_anew(tmp_path: Path) -> None:
    """Each try of a signed infer call carries its own nonce and a digest of the body sent."""
    from http_message_signatures import ContentDigest

    key = tmp_path / "key.json"
    public_key = splitvault_client.create_signing_key(key, key_id="k_0123abcd", deployment="d1")
    assert public_key.startswith("ed25519:") and (key.stat().st_mode & 0o777) == 0o600
    server = FakeServer({"/base/v2/models/digits/infer": [fail(503), ok(CLASSIFICATION)]})
    pixels = np.zeros((1, 4), np.float32)
    with server.client(retries=1, backoff=0, signing_key=key) as client:
        client.predict("digits", {"pixels": pixels}, top_k=2)
    first, second = server.inferences()
    for request in (first, second):
        assert request.headers["splitvault-claims"] == (
            'key="k_0123abcd", deployment="d1", model="digits", rows=1, k=2, shapes=("pixels:1x4")'
        )
        ContentDigest.verify(request.headers["content-digest"], request.content)
        assert request.headers["signature-input"].startswith(
            'sv=("@method" "content-digest" "splitvault-claims");created='
        )
    assert first.headers["signature-input"] != second.headers["signature-input"]  # new nonce


def test_a_client_without_a_signing_key_sends_no_signature() -> None:
    server = FakeServer({"/base/v2/models/digits/infer": [ok(CLASSIFICATION)]})
    with server.client() as client:
        client.predict("digits", {"pixels": np.zeros((1, 4), np.float32)})
    assert "signature" not in server.requests[0].headers
