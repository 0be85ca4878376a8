"""Hostile and sloppy requests: each gets a 4xx ``{"error": ...}`` and the server keeps serving."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import Tiers

pytestmark = pytest.mark.slow

DIGITS = "/v2/models/digits/infer"
MINILM = "/v2/models/minilm/infer"
VOCAB = 30522  # all-MiniLM-L6-v2's vocabulary size: valid ids are 0..30521
MIB = 1024 * 1024


def _image(batch: int = 2, shape: list[int] | None = None, **overrides: Any) -> dict[str, Any]:
    shape = shape or [batch, 1, 8, 8]
    if "data" not in overrides:
        overrides["data"] = [0.5] * math.prod(shape)
    return {"name": "image", "shape": shape, "datatype": "FP32", **overrides}


def _digits(*inputs: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"inputs": list(inputs) or [_image()], **extra}


def _tokens(name: str, batch: int, seq: int, value: Any = 101) -> dict[str, Any]:
    return {
        "name": name,
        "shape": [batch, seq],
        "datatype": "INT64",
        "data": [value] * (batch * seq),
    }


def _minilm(
    ids: dict[str, Any] | None = None, mask: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {
        "inputs": [ids or _tokens("input_ids", 1, 5), mask or _tokens("attention_mask", 1, 5, 1)]
    }


@pytest.fixture(scope="module")
def http(tiers: Tiers) -> Iterator[httpx.Client]:
    with tiers.http(timeout=60.0) as client:
        yield client


@pytest.fixture(autouse=True)
def _no_server_fault(tiers: Tiers) -> Iterator[None]:
    """No request of this module may make either tier log an unhandled error or a traceback."""
    seen = {"public": len(tiers.public.lines), "private": len(tiers.private.lines)}
    yield
    for name, tier in (("public", tiers.public), ("private", tiers.private)):
        new = tier.lines[seen[name] :]
        faults = [line for line in new if "unhandled_error" in line or "Traceback" in line]
        assert not faults, f"{name} tier logged a fault: {faults[:3]}"


def _assert_refused(reply: httpx.Response, status: int, *mentions: str) -> str:
    """The reply is ``status`` with a JSON ``{"error": msg}`` naming each of ``mentions``."""
    assert reply.status_code == status, reply.text
    assert reply.headers["content-type"].startswith("application/json"), reply.headers
    body = reply.json()
    assert set(body) == {"error"}, body
    message = body["error"]
    assert isinstance(message, str) and message
    for word in mentions:
        assert word.lower() in message.lower(), (word, message)
    assert "Traceback" not in message
    return message


def _assert_still_serving(http: httpx.Client) -> None:
    reply = http.post(DIGITS, json=_digits())
    assert reply.status_code == 200, reply.text
    assert reply.json()["outputs"][0]["shape"] == [2, 3]


BAD_JSON_BODIES: list[Any] = [
    pytest.param("/v2/models/nope/infer", _digits(), 404, ["nope"], id="unknown-model"),
    pytest.param(DIGITS, _digits(_image(name="img")), 400, ["img", "image"], id="wrong-input-name"),
    pytest.param(DIGITS, _digits(_image(shape=[2, 64])), 400, ["image", "dimensions"], id="rank"),
    pytest.param(
        DIGITS, _digits(_image(shape=[2, 1, 4, 16])), 400, ["image", "dimension 2"], id="fixed-dim"
    ),
    pytest.param(
        DIGITS,
        _digits(_image(data=[0.5] * 64)),
        400,
        ["image", "64 elements", "128"],
        id="count-mismatch",
    ),
    pytest.param(
        DIGITS, _digits(_image(shape=[-2, 1, 8, 8], data=[])), 400, ["negative"], id="negative-dim"
    ),
    pytest.param(
        DIGITS,
        _digits(_image(datatype="INT64", data=[1] * 128)),
        400,
        ["image", "FP32"],
        id="int64-for-fp32",
    ),
    pytest.param(DIGITS, _digits(_image(datatype="FP8")), 400, ["FP8"], id="unknown-datatype"),
    pytest.param(
        DIGITS, _digits(_image(data=["a"] * 128)), 400, ["image", "numbers"], id="strings"
    ),
    pytest.param(
        DIGITS, _digits(_image(data=[0.5] * 127 + [None])), 400, ["image", "numbers"], id="null"
    ),
    pytest.param(
        DIGITS,
        _digits(_image(data=[[0.5] * 64, [0.5] * 63])),
        400,
        ["image", "rectangular"],
        id="ragged",
    ),
    pytest.param(DIGITS, _digits(_image(data=[{"x": 1}] * 128)), 400, ["image"], id="objects"),
    pytest.param(DIGITS, _digits(_image(data="0.5")), 400, ["data"], id="data-not-a-list"),
    pytest.param(DIGITS, _digits(_image(batch=65)), 400, ["batch", "65", "64"], id="batch-65"),
    pytest.param(
        DIGITS,
        _digits(_image(shape=[10**8, 1, 8, 8], data=[])),
        413,
        ["elements"],
        id="too-many-elements",
    ),
    pytest.param(DIGITS, {"inputs": []}, 400, ["inputs"], id="empty-inputs"),
    pytest.param(DIGITS, {}, 400, ["inputs"], id="no-inputs"),
    pytest.param(DIGITS, _digits(_image(), _image()), 400, ["image", "twice"], id="duplicate"),
    pytest.param(
        DIGITS, _digits(parameters={"classification": 0}), 400, ["classification"], id="k-zero"
    ),
    pytest.param(
        DIGITS, _digits(parameters={"classification": -3}), 400, ["classification"], id="k-negative"
    ),
    pytest.param(
        DIGITS, _digits(parameters={"classification": "x"}), 400, ["classification"], id="k-string"
    ),
    pytest.param(
        DIGITS, _digits(parameters={"classification": True}), 400, ["classification"], id="k-bool"
    ),
    pytest.param(
        DIGITS, _digits(parameters={"classification": 2.5}), 400, ["classification"], id="k-float"
    ),
    pytest.param(
        DIGITS,
        _digits(outputs=[{"name": "classification", "parameters": {"classification": 0}}]),
        400,
        ["classification"],
        id="output-k-zero",
    ),
    pytest.param(
        MINILM,
        _minilm(_tokens("input_ids", 1, 5, 101.5)),
        400,
        ["input_ids", "integers"],
        id="floats-for-int64",
    ),
    pytest.param(
        MINILM,
        _minilm(_tokens("input_ids", 1, 5, VOCAB)),
        400,
        ["input_ids", str(VOCAB - 1)],
        id="id-past-vocabulary",
    ),
    pytest.param(
        MINILM, _minilm(_tokens("input_ids", 1, 5, -1)), 400, ["input_ids"], id="negative-id"
    ),
    pytest.param(
        MINILM, _minilm(_tokens("input_ids", 1, 5, 2**63)), 400, ["input_ids"], id="id-past-int64"
    ),
    pytest.param(
        MINILM,
        _minilm(mask=_tokens("attention_mask", 1, 6, 1)),
        400,
        ["seq", "6", "5"],
        id="seq-mismatch",
    ),
    pytest.param(
        MINILM,
        _minilm(mask=_tokens("attention_mask", 2, 5, 1)),
        400,
        ["batch"],
        id="batch-mismatch",
    ),
    pytest.param(
        MINILM,
        _minilm(mask=_tokens("attention_mask", 1, 5, 2)),
        400,
        ["attention_mask"],
        id="mask-not-binary",
    ),
    pytest.param(
        MINILM,
        _minilm(_tokens("input_ids", 1, 513), _tokens("attention_mask", 1, 513, 1)),
        400,
        ["seq", "513", "512"],
        id="seq-513",
    ),
    pytest.param(
        MINILM,
        {"inputs": [_tokens("input_ids", 1, 5)]},
        400,
        ["attention_mask"],
        id="missing-input",
    ),
]


@pytest.mark.parametrize(("path", "body", "status", "mentions"), BAD_JSON_BODIES)
def test_bad_json_request_is_refused(
    http: httpx.Client, path: str, body: Any, status: int, mentions: list[str]
) -> None:
    _assert_refused(http.post(path, json=body), status, *mentions)
    _assert_still_serving(http)


def _raw_image(value: str) -> bytes:
    data = ",".join(["0.5"] * 127 + [value])
    return (
        '{"inputs":[{"name":"image","shape":[2,1,8,8],"datatype":"FP32","data":[' + data + "]}]}"
    ).encode()


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_are_refused(http: httpx.Client, value: str) -> None:
    reply = http.post(
        DIGITS, content=_raw_image(value), headers={"content-type": "application/json"}
    )
    _assert_refused(reply, 400, "image", "NaN or infinite")
    _assert_still_serving(http)


@pytest.mark.parametrize(
    ("content", "mention"),
    [
        pytest.param(b'{"inputs": [', "JSON", id="truncated"),
        pytest.param(b"not json", "JSON", id="text"),
        pytest.param(b'{"inputs": [1, 2,]}', "JSON", id="trailing-comma"),
        pytest.param(b"\xff\xfe\x00", "body", id="not-utf8"),  # FastAPI: "error parsing the body"
    ],
)
def test_malformed_json_is_refused(http: httpx.Client, content: bytes, mention: str) -> None:
    reply = http.post(DIGITS, content=content, headers={"content-type": "application/json"})
    _assert_refused(reply, 400, mention)
    _assert_still_serving(http)


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded"])
def test_wrong_content_type_is_a_client_error(http: httpx.Client, content_type: str) -> None:
    content = httpx.Request("POST", "/", json=_digits()).read()
    reply = http.post(DIGITS, content=content, headers={"content-type": content_type})
    assert 400 <= reply.status_code < 500, reply.text
    _assert_refused(reply, reply.status_code)
    _assert_still_serving(http)


def _oversized() -> bytes:
    padding = b" " * (17 * MIB)
    return b'{"inputs": []' + padding + b"}"


def test_oversized_body_with_content_length_is_413(http: httpx.Client) -> None:
    content = _oversized()
    reply = http.post(DIGITS, content=content, headers={"content-type": "application/json"})
    _assert_refused(reply, 413, str(16 * MIB))
    _assert_still_serving(http)


def test_oversized_chunked_body_is_413(http: httpx.Client) -> None:
    content = _oversized()

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(content), MIB):
            yield content[start : start + MIB]

    reply = http.post(DIGITS, content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in reply.request.headers
    assert reply.request.headers["transfer-encoding"] == "chunked"
    _assert_refused(reply, 413, str(16 * MIB))
    _assert_still_serving(http)


@pytest.mark.parametrize(
    "name", ["Digits", "bad$name", "-digits", "a" * 65, "digits%20x", "..%2F..%2Fetc"]
)
def test_illegal_model_name_is_a_client_error(http: httpx.Client, name: str) -> None:
    reply = http.post(f"/v2/models/{name}/infer", json=_digits())
    assert reply.status_code in (400, 404, 422), reply.text
    _assert_refused(reply, reply.status_code)
    _assert_still_serving(http)


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
def test_wrong_method_on_infer_is_405(http: httpx.Client, method: str) -> None:
    reply = http.request(method, DIGITS)
    _assert_refused(reply, 405, "method")
    assert "POST" in reply.headers["allow"]
    _assert_still_serving(http)


def test_unknown_path_is_404_json(http: httpx.Client) -> None:
    _assert_refused(http.get("/v2/nothing/here"), 404)
    _assert_refused(http.get("/v2/models/nope"), 404, "nope")
    _assert_still_serving(http)
