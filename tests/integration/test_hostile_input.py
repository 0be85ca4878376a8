"""Hostile input against both tiers: each refused with a clear 4xx (or gRPC status) or the
connection closed within the configured timeouts, memory bounded, and the tier still serving.

The HTTP cases run against a public tier of this module (a copy of the session deployment
without MiniLM) with short read deadlines: headers within 2 s, a body within 3 s, at most 64
connections, 65,536 elements per tensor. It talks to the session's private tier, which the
gRPC cases call directly with the public tier's own client certificate. Sloppy requests (bad
shapes, names, datatypes, malformed JSON, oversized bodies) are in test_bad_input.py.
"""

from __future__ import annotations

import json
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
import numpy as np
import pytest

from protos import inference_pb2, inference_pb2_grpc
from shared.layout import PRIVATE_IDENTITY, DeployLayout
from shared.manifest import DimSpec, read_manifest
from shared.tensor_codec import MAX_RANK
from tests.conftest import Tiers, issue_key
from tests.support.deployments import pairing_id
from tests.support.processes import TierProcess, start_public
from tests.support.stack import copy_deployment, https, poll, rss_mib, tier_env

pytestmark = pytest.mark.slow

HEADER_TIMEOUT_S, BODY_TIMEOUT_S = 2.0, 3.0
MAX_CONNECTIONS, MAX_ELEMENTS, MAX_HEADER_BYTES = 64, 65_536, 8192
ENV = {
    **tier_env(),
    "SPLITVAULT_PUBLIC_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
    "SPLITVAULT_PUBLIC_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S),
    "SPLITVAULT_PUBLIC_MAX_CONNECTIONS": str(MAX_CONNECTIONS),
    "SPLITVAULT_PUBLIC_MAX_ELEMENTS": str(MAX_ELEMENTS),
    "SPLITVAULT_PUBLIC_MAX_HEADER_BYTES": str(MAX_HEADER_BYTES),
}
DIGITS = "/v2/models/digits/infer"
# Scheduling slack on top of a configured timeout: the tier closes a connection about when
# the timeout expires, and the bounds check that it does, not its punctuality. 8 s keeps a
# stalled, loaded machine from failing them while a tier that ignored the timeout (keeping
# the connection for ever) still fails.
SLACK_S = 8.0


@dataclass
class Hostile:
    """The module's public tier, its deployment copy and key, and its memory at the start."""

    layout: DeployLayout
    tier: TierProcess
    key: str
    rss_at_start: float

    def http(self, **kwargs: Any) -> httpx.Client:
        return https(self.layout, self.tier.port, self.key, **kwargs)

    def tls_socket(self) -> ssl.SSLSocket:
        """A raw TLS connection to the tier, handshake done, nothing sent."""
        context = ssl.create_default_context(cafile=str(self.layout.public.ca_cert))
        raw = socket.create_connection(("127.0.0.1", self.tier.port), timeout=30)
        return context.wrap_socket(raw, server_hostname="localhost")


@pytest.fixture(scope="module")
def hostile(tiers: Tiers, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hostile]:
    root = tmp_path_factory.mktemp("hostile") / "d"
    layout = copy_deployment(tiers.deployment.root, root, skip_models={"minilm"})
    key = issue_key(layout, "hostile")
    tier = start_public(layout.root, tiers.private.port, env=ENV)
    try:
        stack = Hostile(layout, tier, key, 0.0)
        with stack.http() as http:
            for _ in range(3):  # warm up: the first requests allocate caches and pools
                _assert_serving(http)
        stack.rss_at_start = rss_mib(tier.process.pid)
        yield stack
    finally:
        tier.stop()


@pytest.fixture(autouse=True)
def _no_fault_logged(hostile: Hostile, tiers: Tiers) -> Iterator[None]:
    """No hostile input may make a tier log an unhandled error or a traceback."""
    seen = {"public": len(hostile.tier.lines), "private": len(tiers.private.lines)}
    yield
    for name, tier in (("public", hostile.tier), ("private", tiers.private)):
        faults = [
            line
            for line in tier.lines[seen[name] :]
            if "unhandled_error" in line or "Traceback" in line or "infer_failed" in line
        ]
        assert not faults, f"the {name} tier logged a fault: {faults[:3]}"


def _digits(batch: int = 1, **tensor: Any) -> dict[str, Any]:
    image = {"name": "image", "shape": [batch, 1, 8, 8], "datatype": "FP32"}
    image["data"] = [0.5] * (batch * 64)
    return {"inputs": [{**image, **tensor}]}


def _assert_serving(http: httpx.Client) -> None:
    reply = http.post(DIGITS, json=_digits())
    assert reply.status_code == 200, reply.text
    assert reply.json()["outputs"][0]["shape"] == [1, 3]


def _assert_error(reply: httpx.Response, status: int, *mentions: str) -> None:
    assert reply.status_code == status, reply.text
    body = reply.json()
    assert set(body) == {"error"} and body["error"], body
    for word in mentions:
        assert word.lower() in body["error"].lower(), (word, body)


def _post_raw(http: httpx.Client, content: bytes, content_type: str = "application/json") -> Any:
    return http.post(DIGITS, content=content, headers={"content-type": content_type})


# --- bodies -------------------------------------------------------------------------------


def _nested(depth: int, leaf: str = "0.5") -> str:
    return "[" * depth + leaf + "]" * depth


@pytest.mark.parametrize("depth", [64, 900, 5_000, 100_000])
def test_very_deep_json_is_a_clean_400(hostile: Hostile, depth: int) -> None:
    tensor = '{"name":"image","shape":[1,1,8,8],"datatype":"FP32","data":' + _nested(depth) + "}"
    deep_data = ('{"inputs":[' + tensor + "]}").encode()
    deep_body = ('{"inputs":' + _nested(depth, "{}") + "}").encode()
    deep_object = ('{"parameters":' + '{"a":' * depth + "1" + "}" * depth + "}").encode()
    with hostile.http() as http:
        for content in (deep_data, deep_body, deep_object):
            _assert_error(_post_raw(http, content), 400)
        _assert_serving(http)


def test_more_elements_than_allowed_is_413(hostile: Hostile) -> None:
    count = MAX_ELEMENTS * 3  # a 200 KB body, far inside the 16 MiB body limit
    data = "[" + ",".join(["0"] * count) + "]"
    declared = (
        f'{{"inputs":[{{"name":"image","shape":[{count}],"datatype":"FP32","data":{data}}}]}}'
    )
    small_shape = (
        f'{{"inputs":[{{"name":"image","shape":[1,1,8,8],"datatype":"FP32","data":{data}}}]}}'
    )
    huge_shape = {
        "inputs": [{"name": "image", "shape": [2**40, 2**40], "datatype": "FP32", "data": [1]}]
    }
    with hostile.http() as http:
        _assert_error(_post_raw(http, declared.encode()), 413, str(MAX_ELEMENTS))
        _assert_error(_post_raw(http, small_shape.encode()), 413, str(MAX_ELEMENTS))
        _assert_error(http.post(DIGITS, json=huge_shape), 413, str(MAX_ELEMENTS))
        many_inputs = {"inputs": [_digits()["inputs"][0]] * 64}  # the most inputs a body may name
        _assert_error(http.post(DIGITS, json=many_inputs), 400, "twice")
        _assert_serving(http)


NOT_UTF8 = {
    "invalid-byte": b'{"id":"\xff\xfe","inputs":[]}',
    "truncated-sequence": b'{"id":"\xc3","inputs":[]}',
    "overlong-slash": b'{"id":"\xc0\xaf","inputs":[]}',
    "encoded-surrogate": b'{"id":"\xed\xa0\x80","inputs":[]}',
    "escaped-lone-surrogate": b'{"id":"\\ud800","inputs":[]}',
    "latin-1": '{"id":"caf\xe9","inputs":[]}'.encode("latin-1"),
}


@pytest.mark.parametrize("content", NOT_UTF8.values(), ids=NOT_UTF8.keys())
def test_non_utf8_bodies_are_400(hostile: Hostile, content: bytes) -> None:
    with hostile.http() as http:
        _assert_error(_post_raw(http, content), 400)
        _assert_serving(http)


def test_non_utf8_in_path_and_headers_is_refused(hostile: Hostile) -> None:
    with hostile.http() as http:
        _assert_error(http.post("/v2/models/%ff%fe/infer", json=_digits()), 400)
        bad_key = {b"authorization": b"Bearer sv_\xff\xfe"}  # bytes: httpx sends them as is
        _assert_error(http.post(DIGITS, json=_digits(), headers=bad_key), 401)
        _assert_serving(http)


@pytest.mark.parametrize(
    "content_type",
    ["application/xml", "multipart/form-data; boundary=x", "application/octet-stream"],
)
def test_wrong_content_types_are_400(hostile: Hostile, content_type: str) -> None:
    content = json.dumps(_digits()).encode()
    with hostile.http() as http:
        reply = http.post(DIGITS, content=content, headers={"content-type": content_type})
        _assert_error(reply, 400)
        _assert_serving(http)


def test_no_content_type_is_read_as_json(hostile: Hostile) -> None:
    """As stock v2 clients (tritonclient) send it (issue 16)."""
    with hostile.http() as http:
        reply = http.post(DIGITS, content=json.dumps(_digits()).encode())
        assert reply.status_code == 200, reply.text


# --- slow and idle clients ----------------------------------------------------------------


def _closed_within(
    sock: ssl.SSLSocket, limit: float, since: float | None = None
) -> tuple[float, bytes]:
    """Seconds from ``since`` (default: now) until the server closes ``sock`` (EOF or reset),
    and what it sent before."""
    started = time.monotonic() if since is None else since
    received = b""
    sock.settimeout(limit)
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except (ConnectionError, ssl.SSLError):
        pass
    except TimeoutError:
        pytest.fail(f"the server kept a hostile connection open for {limit} s")
    return time.monotonic() - started, received


def _drip_until_closed(
    sock: ssl.SSLSocket, data: bytes, limit: float, since: float | None = None
) -> tuple[float, bytes]:
    """Send ``data`` a byte every 0.2 s until the server closes ``sock``; as ``_closed_within``.

    One thread sends and reads in turn: an SSL socket read and written from two threads at
    once can fail with an SSL error, which would look like the server hanging up.
    """
    started = time.monotonic() if since is None else since
    received = b""
    for byte in data:
        if time.monotonic() - started > limit:
            pytest.fail(f"the server kept a hostile connection open for {limit} s")
        try:
            sock.send(bytes([byte]))
            sock.settimeout(0.2)
            chunk = sock.recv(65536)
        except TimeoutError:
            continue  # still open: the next byte
        except OSError:  # reset, or an SSL error on a closed connection
            return time.monotonic() - started, received
        if not chunk:
            return time.monotonic() - started, received
        received += chunk
    elapsed, rest = _closed_within(sock, limit, started)  # all sent: wait for the close
    return elapsed, received + rest


def _wait_for_read_timeout(hostile: Hostile, seen: int, phase: str) -> None:
    """Until the tier has logged a read timeout in ``phase`` after its first ``seen``: a log
    line reaches the test through a pipe, a moment after the connection closed."""

    def logged() -> bool:
        events = [e for e in hostile.tier.events() if e.get("event") == "http_read_timeout"]
        return any(e["phase"] == phase for e in events[seen:])

    poll(logged, f"the tier to log a read timeout in the {phase}", 30)


def _read_timeouts_seen(hostile: Hostile) -> int:
    return sum(e.get("event") == "http_read_timeout" for e in hostile.tier.events())


def test_connection_that_sends_nothing_is_closed(hostile: Hostile) -> None:
    seen = _read_timeouts_seen(hostile)
    connecting = time.monotonic()  # the tier's timer cannot start before the connection
    with hostile.tls_socket() as sock:
        elapsed, received = _closed_within(sock, HEADER_TIMEOUT_S + SLACK_S + 10, connecting)
    assert received == b""
    assert HEADER_TIMEOUT_S - 0.1 < elapsed < HEADER_TIMEOUT_S + SLACK_S
    _wait_for_read_timeout(hostile, seen, "headers")
    with hostile.http() as http:
        _assert_serving(http)


def test_headers_sent_a_byte_at_a_time_are_cut_off(hostile: Hostile) -> None:
    request = f"POST {DIGITS} HTTP/1.1\r\nHost: localhost\r\n".encode() + b"X-Pad: a\r\n" * 50
    with hostile.tls_socket() as sock:
        elapsed, received = _drip_until_closed(sock, request, HEADER_TIMEOUT_S + SLACK_S + 10)
    assert received == b"" and elapsed < HEADER_TIMEOUT_S + SLACK_S
    with hostile.http() as http:
        _assert_serving(http)


def test_body_sent_a_byte_at_a_time_is_cut_off(hostile: Hostile) -> None:
    body = json.dumps(_digits()).encode()
    head = (
        f"POST {DIGITS} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {hostile.key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    seen = _read_timeouts_seen(hostile)
    with hostile.tls_socket() as sock:
        sending = time.monotonic()  # the body's timer cannot start before its headers are sent
        sock.sendall(head)  # the headers arrive at once: the body deadline applies
        elapsed, _ = _drip_until_closed(sock, body, BODY_TIMEOUT_S + SLACK_S + 10, sending)
    assert BODY_TIMEOUT_S - 0.1 < elapsed < BODY_TIMEOUT_S + SLACK_S
    _wait_for_read_timeout(hostile, seen, "body")
    with hostile.http() as http:
        _assert_serving(http)


def test_oversized_headers_are_refused_and_closed(hostile: Hostile) -> None:
    request = b"GET /v2 HTTP/1.1\r\nHost: localhost\r\nX-Big: " + b"a" * MAX_HEADER_BYTES * 2
    with hostile.tls_socket() as sock:
        sock.sendall(request + b"\r\n\r\n")
        _, received = _closed_within(sock, 10)
    assert received.startswith(b"HTTP/1.1 400 "), received[:100]
    with hostile.http() as http:
        _assert_serving(http)


def _shed_past_the_bound(hostile: Hostile) -> tuple[httpx.Response, bool]:
    """Open more idle connections than the tier allows, then send a request: its answer, and
    whether it came before the first connection's header timeout (all were open: it must be
    shed). Every connection is then closed by the tier within the header timeout."""
    started = time.monotonic()  # no connection's timer starts before this
    sockets = [hostile.tls_socket() for _ in range(MAX_CONNECTIONS + 16)]
    try:
        with hostile.http(timeout=30) as http:
            reply = http.post(DIGITS, json=_digits())
            all_open = time.monotonic() - started < HEADER_TIMEOUT_S
            assert hostile.tier.process.poll() is None
            opened = time.monotonic()
            for sock in sockets:
                _closed_within(sock, HEADER_TIMEOUT_S + SLACK_S + 10)
            assert time.monotonic() - opened < HEADER_TIMEOUT_S + SLACK_S
    finally:
        for sock in sockets:
            sock.close()
    return reply, all_open


def test_many_idle_connections_are_bounded_and_closed(hostile: Hostile) -> None:
    # Past the connection bound, requests are shed with a 503 (not queued for ever). If opening
    # the connections outlasted the header timeout, the tier may rightly have closed some of
    # them before the request came: then the attempt shows nothing and is made again.
    for _ in range(3):
        shed, all_open = _shed_past_the_bound(hostile)
        if all_open or shed.status_code == 503:
            break
    assert shed.status_code == 503, (all_open, shed.text)
    with hostile.http() as http:
        poll(lambda: http.post(DIGITS, json=_digits()).status_code == 200, "serving", 10)


def test_memory_stays_bounded_after_the_hostile_batch(hostile: Hostile) -> None:
    """Last: the tier's resident memory after everything above, and this batch again."""
    count = MAX_ELEMENTS * 3
    data = "[" + ",".join(["0"] * count) + "]"
    oversized = f'{{"inputs":[{{"name":"image","shape":[1],"datatype":"FP32","data":{data}}}]}}'
    with hostile.http() as http:
        for _ in range(20):
            _post_raw(http, ('{"inputs":' + _nested(100_000, "{}") + "}").encode())
            _post_raw(http, oversized.encode())
            _post_raw(http, NOT_UTF8["invalid-byte"])
        _assert_serving(http)
    grown = rss_mib(hostile.tier.process.pid) - hostile.rss_at_start
    assert grown < 50, f"resident memory grew by {grown:.0f} MiB"


# --- gRPC ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stub(tiers: Tiers) -> Iterator[inference_pb2_grpc.PrivateInferenceStub]:
    """The private tier, called with the public tier's own (valid) client certificate."""
    layout = tiers.deployment.layout
    credentials = grpc.ssl_channel_credentials(
        root_certificates=layout.public.ca_cert.read_bytes(),
        private_key=(layout.public.tls / "client.key").read_bytes(),
        certificate_chain=(layout.public.tls / "client.crt").read_bytes(),
    )
    options = [("grpc.ssl_target_name_override", PRIVATE_IDENTITY)]
    with grpc.secure_channel(tiers.private_address, credentials, options=options) as channel:
        yield inference_pb2_grpc.PrivateInferenceStub(channel)


@pytest.fixture(scope="module")
def activation(tiers: Tiers) -> inference_pb2.Tensor:
    """A valid activation for digits' back stage (batch 1, FP16), from its private manifest."""
    (spec,) = read_manifest(tiers.deployment.layout.private.model("digits")).inputs
    shape = [1 if isinstance(dim, DimSpec) else dim for dim in spec.shape]
    data = np.zeros(shape, dtype=np.float16).tobytes()
    return inference_pb2.Tensor(name=spec.name, datatype="FP16", shape=shape, data=data)


def _tensor(base: inference_pb2.Tensor, **changes: Any) -> inference_pb2.Tensor:
    tensor = inference_pb2.Tensor()
    tensor.CopyFrom(base)
    for name, value in changes.items():
        if name == "shape":
            del tensor.shape[:]
            tensor.shape.extend(value)
        else:
            setattr(tensor, name, value)
    return tensor


INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND


def _malformed(a: inference_pb2.Tensor) -> dict[str, tuple[Any, grpc.StatusCode, str]]:
    """name -> (InferRequest fields, expected code, a word the message must hold)."""
    size = len(a.data)
    return {
        "short-data": ({"inputs": [_tensor(a, data=a.data[:-3])]}, INVALID, "bytes"),
        "long-data": ({"inputs": [_tensor(a, data=a.data + b"\0")]}, INVALID, "bytes"),
        "fp32-length-for-fp16": ({"inputs": [_tensor(a, datatype="FP32")]}, INVALID, "bytes"),
        "unknown-model": ({"model": "no-such-model"}, NOT_FOUND, "no-such-model"),
        "empty-model": ({"model": ""}, NOT_FOUND, "not deployed"),
        "unknown-datatype": ({"inputs": [_tensor(a, datatype="FP8")]}, INVALID, "FP8"),
        "bytes-datatype": ({"inputs": [_tensor(a, datatype="BYTES")]}, INVALID, "BYTES"),
        "integer-datatype": ({"inputs": [_tensor(a, datatype="INT16")]}, INVALID, "datatype"),
        "duplicate-input": ({"inputs": [a, a]}, INVALID, "twice"),
        "missing-input": ({"inputs": []}, INVALID, "inputs must be"),
        "unknown-input": ({"inputs": [_tensor(a, name="x")]}, INVALID, "inputs must be"),
        "transposed-shape": (
            {"inputs": [_tensor(a, shape=[1, *list(a.shape)[1:][::-1]])]},
            INVALID,
            "dimension",
        ),
        "wrong-rank": ({"inputs": [_tensor(a, shape=[size // 2])]}, INVALID, "dimensions"),
        "zero-batch": (
            {"inputs": [_tensor(a, shape=[0, *a.shape[1:]], data=b"")]},
            INVALID,
            "batch",
        ),
        "batch-over-limit": (
            {"inputs": [_tensor(a, shape=[65, *a.shape[1:]], data=a.data * 65)]},
            INVALID,
            "batch",
        ),
        "huge-shape-tiny-data": (
            {"inputs": [_tensor(a, shape=[2**62, 2**62, 2**62, 2**62])]},
            INVALID,
            "bytes",
        ),
        "negative-dimension": (
            {"inputs": [_tensor(a, shape=[-1, *a.shape[1:]])]},
            INVALID,
            "negative",
        ),
        "rank-beyond-numpy": (
            {"inputs": [_tensor(a, shape=[1] * 100, data=b"\0\0")]},
            INVALID,
            str(MAX_RANK),
        ),
        "many-zero-dimensions": (
            {"inputs": [_tensor(a, shape=[0] * 70, data=b"")]},
            INVALID,
            str(MAX_RANK),
        ),
    }


def test_malformed_activations_get_a_clear_status(
    stub: inference_pb2_grpc.PrivateInferenceStub, activation: inference_pb2.Tensor, tiers: Tiers
) -> None:
    refused: dict[str, tuple[grpc.StatusCode, str]] = {}
    paired = pairing_id(tiers.deployment.layout, "digits")  # public: any caller can send it
    for name, (fields, _, _) in _malformed(activation).items():
        request = inference_pb2.InferRequest(
            **{"model": "digits", "inputs": [activation], "pairing_id": paired, **fields}
        )
        with pytest.raises(grpc.RpcError) as caught:
            stub.Infer(request, timeout=10)
        refused[name] = (caught.value.code(), caught.value.details() or "")
    for name, (_, code, word) in _malformed(activation).items():
        got, details = refused[name]
        assert got == code, (name, got, details)
        assert word.lower() in details.lower(), (name, details)
    good = inference_pb2.InferRequest(model="digits", inputs=[activation], pairing_id=paired)
    ok = stub.Infer(good, timeout=10)
    assert [output.name for output in ok.outputs] == ["indices", "scores"]
    assert tiers.private.process.poll() is None
