"""The stock Triton clients (``tritonclient.http`` and ``tritonclient.grpc``) against the public
tier, real processes: only their documented TLS and header options are set.

One private tier and one public tier with its v2 gRPC ingress on, on a copy of the session
deployment (digits and MiniLM); keys issued before the tiers start.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import gevent.ssl
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from public_api.audit import AUDIT_DB
from public_api.keys import STATE_DIR, parse_key_id
from shared.layout import DeployLayout
from tests.conftest import Deployment, DigitsFixture, issue_key
from tests.support.deployments import copy_deployment
from tests.support.processes import TierProcess, start_private, start_public
from tests.support.stack import https, image_request, poll, tier_env

pytestmark = pytest.mark.slow

KEYS: dict[str, dict[str, Any]] = {"triton": {}, "burst-8": {"rate_per_s": 0.01, "burst": 8}}


@dataclass(frozen=True)
class Stack:
    layout: DeployLayout
    public: TierProcess
    grpc_port: int
    keys: dict[str, str]

    def http(self) -> httpclient.InferenceServerClient:
        ca = str(self.layout.public.ca_cert)
        return httpclient.InferenceServerClient(
            f"localhost:{self.public.port}",
            ssl=True,
            ssl_context_factory=lambda: gevent.ssl.create_default_context(cafile=ca),
        )

    def grpc(self) -> grpcclient.InferenceServerClient:
        return grpcclient.InferenceServerClient(
            f"localhost:{self.grpc_port}",
            ssl=True,
            root_certificates=str(self.layout.public.ca_cert),
        )

    def auth(self, name: str = "triton") -> dict[str, str]:
        return {"authorization": f"Bearer {self.keys[name]}"}

    def audit(self, key: str) -> list[dict[str, Any]]:
        path = self.layout.public.root / STATE_DIR / AUDIT_DB
        with contextlib.closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)) as db:
            db.row_factory = sqlite3.Row
            rows = db.execute("SELECT * FROM audit WHERE key_id = ? ORDER BY seq", (key,))
            return [dict(row) for row in rows]


@pytest.fixture(scope="module")
def stack(deployment: Deployment, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("triton") / "d"
    layout = copy_deployment(deployment.layout, root, skip_models=(), keep_public_state=False)
    keys = {name: issue_key(layout, name, **limits) for name, limits in KEYS.items()}
    keys["unaccepted"] = issue_key(layout, "unaccepted", accept_terms=False)
    env = {**tier_env(), "SPLITVAULT_PUBLIC_GRPC_PORT": "0"}
    private = start_private(layout.root, env=tier_env())
    try:
        public = start_public(layout.root, private.port, env=env)
        try:
            (listening,) = public.wait_for_events("grpc_ingress_listening")
            yield Stack(layout, public, int(listening["port"]), keys)
        finally:
            public.stop()
    finally:
        private.stop()


def _images(digits_model: DigitsFixture, n: int) -> np.ndarray:
    return np.ascontiguousarray(digits_model.data.test_x[:n], dtype=np.float32)


def _rest_answer(stack: Stack, images: np.ndarray) -> list[str]:
    """The classification strings the JSON REST route gives (the reference)."""
    with https(stack.layout, stack.public.port, stack.keys["triton"]) as http:
        reply = http.post("/v2/models/digits/infer", json=image_request(images))
    assert reply.status_code == 200, reply.text
    return list(reply.json()["outputs"][0]["data"])


def _decoded(array: np.ndarray) -> list[str]:
    """BYTES elements as strings (binary answers decode to bytes, JSON ones to str)."""
    return [item.decode() if isinstance(item, bytes) else item for item in array.ravel()]


# --- tritonclient.http --------------------------------------------------------------------


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_http_client_classifies_like_the_json_route(
    stack: Stack, digits_model: DigitsFixture, binary: bool
) -> None:
    images = _images(digits_model, 5)
    tensor = httpclient.InferInput("image", list(images.shape), "FP32")
    tensor.set_data_from_numpy(images, binary_data=binary)
    wanted = httpclient.InferRequestedOutput("classification", binary_data=binary, class_count=3)
    with contextlib.closing(stack.http()) as client:
        result = client.infer(
            "digits", [tensor], outputs=[wanted], request_id="h-1", headers=stack.auth()
        )
    answer = result.as_numpy("classification")
    assert answer.shape == (5, 3)
    assert _decoded(answer) == _rest_answer(stack, images)
    assert result.get_response()["id"] == "h-1"


def test_http_client_default_request_gets_binary_answer(
    stack: Stack, digits_model: DigitsFixture
) -> None:
    """No outputs named: tritonclient asks for every output in binary (binary_data_output)."""
    images = _images(digits_model, 2)
    tensor = httpclient.InferInput("image", list(images.shape), "FP32")
    tensor.set_data_from_numpy(images)
    with contextlib.closing(stack.http()) as client:
        result = client.infer("digits", [tensor], headers=stack.auth())
    assert _decoded(result.as_numpy("classification")) == _rest_answer(stack, images)


def test_http_client_metadata_lists_the_binary_extension(stack: Stack) -> None:
    with contextlib.closing(stack.http()) as client:
        server = client.get_server_metadata()
        model = client.get_model_metadata("digits", headers=stack.auth())
        assert client.is_server_live()
    assert {"classification", "binary_tensor_data"} <= set(server["extensions"])
    assert [i["name"] for i in model["inputs"]] == ["image"]


def test_http_client_embeds_with_minilm(stack: Stack) -> None:
    ids = np.array([[101, 7592, 2088, 102]], dtype=np.int64)
    inputs = []
    for name, values in (("input_ids", ids), ("attention_mask", np.ones_like(ids))):
        tensor = httpclient.InferInput(name, list(values.shape), "INT64")
        tensor.set_data_from_numpy(values)
        inputs.append(tensor)
    with contextlib.closing(stack.http()) as client:
        result = client.infer("minilm", inputs, headers=stack.auth())
    embedding = result.as_numpy("embedding")
    assert embedding.dtype == np.float32 and embedding.shape[0] == 1
    assert np.isfinite(embedding).all() and np.abs(embedding).sum() > 0


def test_http_binary_request_with_bad_sizes_is_a_clear_400(
    stack: Stack, digits_model: DigitsFixture
) -> None:
    body = b'{"inputs":[{"name":"image","shape":[1,1,8,8],"datatype":"FP32",'
    body += b'"parameters":{"binary_data_size":256}}]}'
    header = str(len(body))
    raw = _images(digits_model, 1).tobytes()
    with https(stack.layout, stack.public.port, stack.keys["triton"]) as http:
        short = http.post(
            "/v2/models/digits/infer",
            content=body + raw[:100],
            headers={"Inference-Header-Content-Length": header},
        )
        extra = http.post(
            "/v2/models/digits/infer",
            content=body + raw + b"xx",
            headers={"Inference-Header-Content-Length": header},
        )
    assert short.status_code == 400 and "runs past" in short.json()["error"]
    assert extra.status_code == 400 and "add up to 256" in extra.json()["error"]


def test_http_binary_request_sent_as_octet_stream_is_served(
    stack: Stack, digits_model: DigitsFixture
) -> None:
    """``application/octet-stream`` with the binary header is the binary extension; without
    the header it is no body this route reads (400)."""
    body = b'{"inputs":[{"name":"image","shape":[1,1,8,8],"datatype":"FP32",'
    body += b'"parameters":{"binary_data_size":256}}]}'
    images = _images(digits_model, 1)
    octet = {"Content-Type": "application/octet-stream"}
    with https(stack.layout, stack.public.port, stack.keys["triton"]) as http:
        served = http.post(
            "/v2/models/digits/infer",
            content=body + images.tobytes(),
            headers={**octet, "Inference-Header-Content-Length": str(len(body))},
        )
        headerless = http.post(
            "/v2/models/digits/infer", content=body + images.tobytes(), headers=octet
        )
    assert served.status_code == 200, served.text
    assert served.json()["outputs"][0]["shape"][0] == 1
    assert headerless.status_code == 400


# --- tritonclient.grpc --------------------------------------------------------------------


def _grpc_inputs(images: np.ndarray) -> list[grpcclient.InferInput]:
    tensor = grpcclient.InferInput("image", list(images.shape), np_to_triton_dtype(images.dtype))
    tensor.set_data_from_numpy(images)
    return [tensor]


def test_grpc_client_classifies_like_the_json_route(
    stack: Stack, digits_model: DigitsFixture
) -> None:
    images = _images(digits_model, 7)
    wanted = grpcclient.InferRequestedOutput("classification", class_count=3)
    with contextlib.closing(stack.grpc()) as client:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("digits", headers=stack.auth())
        metadata = client.get_model_metadata("digits", headers=stack.auth())
        result = client.infer(
            "digits", _grpc_inputs(images), outputs=[wanted], request_id="g-1", headers=stack.auth()
        )
    assert [t.name for t in metadata.inputs] == ["image"]
    answer = result.as_numpy("classification")
    assert answer.shape == (7, 3)
    assert _decoded(answer) == _rest_answer(stack, images)
    assert result.get_response().id == "g-1"


def test_grpc_client_embeds_with_minilm(stack: Stack) -> None:
    ids = np.array([[101, 7592, 2088, 102], [101, 2088, 102, 0]], dtype=np.int64)
    inputs = []
    for name, values in (("input_ids", ids), ("attention_mask", (ids > 0).astype(np.int64))):
        tensor = grpcclient.InferInput(name, list(values.shape), "INT64")
        tensor.set_data_from_numpy(values)
        inputs.append(tensor)
    with contextlib.closing(stack.grpc()) as client:
        result = client.infer("minilm", inputs, headers=stack.auth())
    embedding = result.as_numpy("embedding")
    assert embedding.dtype == np.float32 and embedding.shape[0] == 2


def _grpc_error(stack: Stack, images: np.ndarray, **kwargs: Any) -> InferenceServerException:
    kwargs.setdefault("headers", stack.auth())
    with contextlib.closing(stack.grpc()) as client, pytest.raises(InferenceServerException) as e:
        client.infer(kwargs.pop("model", "digits"), _grpc_inputs(images), **kwargs)
    return e.value


def test_grpc_refusals_carry_clear_statuses(stack: Stack, digits_model: DigitsFixture) -> None:
    images = _images(digits_model, 1)
    missing = _grpc_error(stack, images, headers={})
    assert missing.status() == "StatusCode.UNAUTHENTICATED"
    assert "API key" in missing.message()
    terms = _grpc_error(stack, images, headers=stack.auth("unaccepted"))
    assert terms.status() == "StatusCode.PERMISSION_DENIED"
    assert "/v1/terms" in terms.message()
    unknown = _grpc_error(stack, images, model="nope")
    assert unknown.status() == "StatusCode.NOT_FOUND"


@pytest.mark.parametrize(
    ("images", "says"),
    [
        (np.zeros((1, 1, 4, 4), np.float32), "dimension 2 must be 8"),
        (np.full((1, 1, 8, 8), np.nan, np.float32), "NaN"),
        (np.zeros((1, 1, 8, 8), np.float64), "datatype FP32"),
    ],
    ids=["shape", "nan", "datatype"],
)
def test_grpc_bad_input_is_invalid_argument(stack: Stack, images: np.ndarray, says: str) -> None:
    error = _grpc_error(stack, images)
    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    assert says in error.message()


def test_grpc_raw_contents_of_the_wrong_size_are_invalid_argument(stack: Stack) -> None:
    tensor = grpcclient.InferInput("image", [1, 1, 8, 8], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 1, 8, 8), np.float32))
    tensor.set_shape([1, 1, 8, 4])  # 256 bytes where the shape needs 128
    with contextlib.closing(stack.grpc()) as client, pytest.raises(InferenceServerException) as e:
        client.infer("digits", [tensor], headers=stack.auth())
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "256 bytes" in e.value.message()


def test_grpc_limits_count_samples(stack: Stack, digits_model: DigitsFixture) -> None:
    """A key with a burst of 8 samples: 8 rows pass, the next row is RESOURCE_EXHAUSTED."""
    headers = stack.auth("burst-8")
    with contextlib.closing(stack.grpc()) as client:
        client.infer("digits", _grpc_inputs(_images(digits_model, 8)), headers=headers)
    refused = _grpc_error(stack, _images(digits_model, 1), headers=headers)
    assert refused.status() == "StatusCode.RESOURCE_EXHAUSTED"
    assert "rate limit" in refused.message()


def test_grpc_outcomes_are_audited_with_the_peer_address(
    stack: Stack, digits_model: DigitsFixture
) -> None:
    """Served and refused calls are audited under the key, the address taken from the peer
    (an ``x-forwarded-for`` metadata entry is not believed)."""
    key = parse_key_id(stack.keys["triton"])
    assert key is not None
    before = len(stack.audit(key))
    headers = {**stack.auth(), "x-forwarded-for": "6.6.6.6"}
    with contextlib.closing(stack.grpc()) as client:
        client.infer("digits", _grpc_inputs(_images(digits_model, 2)), headers=headers)
    _grpc_error(stack, np.zeros((1, 1, 4, 4), np.float32), headers=headers)
    expected = [("served", 200, "127.0.0.1"), ("bad_request", 400, "127.0.0.1")]
    rows: list[tuple[str, int, str]] = []

    def written() -> bool:
        # Records are written in order, shortly after their answers: an earlier test's record
        # of this key may still land after ``before`` was counted, never after these two.
        found = stack.audit(key)[before:]
        rows[:] = [(r["decision"], r["status"], r["client"]) for r in found][-2:]
        return len(found) >= 2 and rows == expected

    poll(written, f"this test's two audit records, {expected}, last in the key's trail")
    assert rows == expected


def test_grpc_ingress_refuses_plain_text(stack: Stack) -> None:
    plain = grpcclient.InferenceServerClient(f"localhost:{stack.grpc_port}")
    with contextlib.closing(plain), pytest.raises(InferenceServerException) as e:
        plain.is_server_live()
    assert e.value.status() == "StatusCode.UNAVAILABLE"
