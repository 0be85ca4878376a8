"""Text in for text models, real processes: the v2 ``BYTES`` input ``text`` (JSON, binary and
gRPC, through the stock Triton clients), ``POST /v1/embeddings`` (through the stock OpenAI
client and the SDK), their bad inputs, and the keys, terms, limits in samples and audit they
share with every other ingress.

One private tier and one public tier with its v2 gRPC ingress on, on a copy of the session
deployment (MiniLM, packed with its tokenizer, and digits); keys issued before the tiers start.
"""

from __future__ import annotations

import base64
import contextlib
import sqlite3
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import gevent.ssl
import httpx
import numpy as np
import openai
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from splitvault_client import Client, Embeddings

from public_api.audit import AUDIT_DB
from public_api.keys import STATE_DIR, parse_key_id
from shared.layout import DeployLayout
from splitvault.demo import minilm
from tests.conftest import Deployment, issue_key
from tests.support.deployments import copy_deployment
from tests.support.processes import TierProcess, start_private, start_public
from tests.support.stack import https, poll, tier_env

pytestmark = pytest.mark.slow

MODEL = "minilm"
SENTENCES = ["A man is playing a guitar on stage.", "The stock market fell sharply."]
KEYS: dict[str, dict[str, Any]] = {
    "text": {},
    "burst-4": {"rate_per_s": 0.01, "burst": 4},
    "burst-2": {"rate_per_s": 0.01, "burst": 2},
}


@dataclass(frozen=True)
class Stack:
    layout: DeployLayout
    public: TierProcess
    grpc_port: int
    keys: dict[str, str]

    def http(self, key: str = "text") -> httpx.Client:
        return https(self.layout, self.public.port, self.keys[key])

    def sdk(self) -> Client:
        return Client(
            f"https://localhost:{self.public.port}",
            api_key=self.keys["text"],
            ca=self.layout.public.ca_cert,
        )

    def audit(self, key: str) -> list[dict[str, Any]]:
        path = self.layout.public.root / STATE_DIR / AUDIT_DB
        key_id = parse_key_id(self.keys[key])
        with contextlib.closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)) as db:
            db.row_factory = sqlite3.Row
            rows = db.execute("SELECT * FROM audit WHERE key_id = ? ORDER BY seq", (key_id,))
            return [dict(row) for row in rows]


@pytest.fixture(scope="module")
def stack(deployment: Deployment, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("text") / "d"
    layout = copy_deployment(
        deployment.layout, root, skip_models=("digits-label", "nested"), keep_public_state=False
    )
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


def _token_embeddings(stack: Stack, sentences: list[str]) -> np.ndarray:
    """The reference: the same sentences sent as token ids (the model's own tokenizer)."""
    tokens = minilm.tokenize(sentences)
    inputs = [
        {"name": name, "shape": list(t.shape), "datatype": "INT64", "data": t.flatten().tolist()}
        for name, t in tokens.items()
    ]
    with stack.http() as http:
        reply = http.post(f"/v2/models/{MODEL}/infer", json={"inputs": inputs})
    assert reply.status_code == 200, reply.text
    output = reply.json()["outputs"][0]
    return np.asarray(output["data"], dtype=np.float32).reshape(output["shape"])


def _text_request(sentences: list[Any]) -> dict[str, Any]:
    return {"inputs": [{"name": "text", "shape": [len(sentences)], "datatype": "BYTES",
                        "data": sentences}]}  # fmt: skip


# --- v2 BYTES input -----------------------------------------------------------------------


def test_v2_text_embeds_as_the_token_ids_do(stack: Stack) -> None:
    with stack.http() as http:
        reply = http.post(f"/v2/models/{MODEL}/infer", json=_text_request(SENTENCES))
        metadata = http.get(f"/v2/models/{MODEL}").json()
    assert reply.status_code == 200, reply.text
    output = reply.json()["outputs"][0]
    got = np.asarray(output["data"], dtype=np.float32).reshape(output["shape"])
    np.testing.assert_array_equal(got, _token_embeddings(stack, SENTENCES))
    tokens = [len(ids) for ids in minilm.load_tokenizer()(SENTENCES)["input_ids"]]
    assert reply.json()["parameters"]["prompt_tokens"] == sum(tokens)
    assert reply.json()["parameters"]["truncated"] == []
    assert {"name": "text", "datatype": "BYTES", "shape": [-1]} in metadata["inputs"]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_tritonclient_http_sends_text(stack: Stack, binary: bool) -> None:
    text = httpclient.InferInput("text", [len(SENTENCES)], "BYTES")
    text.set_data_from_numpy(np.array(SENTENCES, dtype=object), binary_data=binary)
    ca = str(stack.layout.public.ca_cert)
    client = httpclient.InferenceServerClient(
        f"localhost:{stack.public.port}",
        ssl=True,
        ssl_context_factory=lambda: gevent.ssl.create_default_context(cafile=ca),
    )
    with contextlib.closing(client):
        auth = {"authorization": f"Bearer {stack.keys['text']}"}
        result = client.infer(MODEL, [text], headers=auth)
    np.testing.assert_array_equal(result.as_numpy("embedding"), _token_embeddings(stack, SENTENCES))


def test_tritonclient_grpc_sends_text(stack: Stack) -> None:
    text = grpcclient.InferInput("text", [len(SENTENCES)], "BYTES")
    text.set_data_from_numpy(np.array(SENTENCES, dtype=object))
    client = grpcclient.InferenceServerClient(
        f"localhost:{stack.grpc_port}",
        ssl=True,
        root_certificates=str(stack.layout.public.ca_cert),
    )
    with contextlib.closing(client):
        auth = {"authorization": f"Bearer {stack.keys['text']}"}
        result = client.infer(MODEL, [text], headers=auth)
    np.testing.assert_array_equal(result.as_numpy("embedding"), _token_embeddings(stack, SENTENCES))
    usage = result.get_response().parameters
    tokens = [len(ids) for ids in minilm.load_tokenizer()(SENTENCES)["input_ids"]]
    assert usage["prompt_tokens"].int64_param == sum(tokens)
    assert usage["truncated"].string_param == "[]"


# --- /v1/embeddings -----------------------------------------------------------------------


@contextlib.contextmanager
def _openai(stack: Stack, key: str = "text") -> Iterator[openai.OpenAI]:
    """The stock OpenAI client on the tier, without retries; ``key`` names an issued key, or
    is the API key itself."""
    context = ssl.create_default_context(cafile=str(stack.layout.public.ca_cert))
    with openai.DefaultHttpxClient(verify=context) as transport:
        yield openai.OpenAI(
            base_url=f"https://localhost:{stack.public.port}/v1",
            api_key=stack.keys.get(key, key),
            http_client=transport,
            max_retries=0,
        )


def test_openai_client_embeds(stack: Stack) -> None:
    """The stock OpenAI client (base64 by default) and a float request agree with token ids."""
    with _openai(stack) as client:
        answer = client.embeddings.create(model=MODEL, input=SENTENCES)
        single = client.embeddings.create(model=MODEL, input=SENTENCES[0], encoding_format="float")
        with pytest.raises(openai.BadRequestError) as refused:
            client.embeddings.create(model=MODEL, input="")
    # OpenAI's error object: the client's message and ``code`` come from it.
    assert refused.value.code == "invalid_input"
    assert "sentence 0 is empty" in refused.value.message
    reference = _token_embeddings(stack, SENTENCES)
    got = np.asarray([item.embedding for item in answer.data], dtype=np.float32)
    np.testing.assert_array_equal(got, reference)
    np.testing.assert_array_equal(np.asarray(single.data[0].embedding, np.float32), reference[0])
    assert answer.model == MODEL and [item.index for item in answer.data] == [0, 1]
    assert answer.usage.prompt_tokens == answer.usage.total_tokens > 0


REFUSALS: list[tuple[str, dict[str, Any], type[openai.APIStatusError], str, str]] = [
    ("unknown-key", {}, openai.AuthenticationError, "authentication_error", "API key"),
    ("unaccepted", {}, openai.PermissionDeniedError, "permission_error", "/v1/terms"),
    ("text", {"model": "absent"}, openai.NotFoundError, "not_found_error", "not deployed"),
    ("text", {"input": ["x"] * 65}, openai.BadRequestError, "invalid_request_error", "65"),
    ("text", {"user": "x" * 300}, openai.BadRequestError, "invalid_request_error", "user"),
    ("burst-2", {"input": ["x"] * 3}, openai.RateLimitError, "rate_limit_error", "burst"),
]


@pytest.mark.parametrize(
    ("key", "body", "raised", "kind", "says"),
    REFUSALS,
    ids=["401", "403", "404", "400", "400-schema", "429"],
)
def test_openai_client_raises_its_own_exception_for_each_refusal(
    stack: Stack,
    key: str,
    body: dict[str, Any],
    raised: type[openai.APIStatusError],
    kind: str,
    says: str,
) -> None:
    """Errors take OpenAI's shape: the stock client raises the class of the status, with the
    tier's message, type and code (the error class, in snake case)."""
    if key == "unknown-key":
        key = "sv_k_00000000_" + "C" * 43
    request = {"model": MODEL, "input": "x", **body}
    with _openai(stack, key) as client, pytest.raises(openai.APIStatusError) as refused:
        client.embeddings.create(**request)
    error = refused.value
    assert type(error) is raised, f"{type(error).__name__}: {error.message}"
    assert says in error.message
    assert isinstance(error.body, dict) and error.body["type"] == kind
    assert error.code and error.code.islower()


def test_sdk_embed(stack: Stack) -> None:
    with stack.sdk() as client:
        result = client.embed(SENTENCES, model=MODEL)
    assert isinstance(result, Embeddings)
    np.testing.assert_array_equal(result.vectors, _token_embeddings(stack, SENTENCES))
    assert result.truncated == () and result.max_tokens_per_input == minilm.MAX_SEQUENCE


def test_a_long_input_is_truncated_and_said_so(stack: Stack) -> None:
    long = "splitvault keeps the back layers private. " * 200  # well over 512 tokens
    with stack.http() as http:
        reply = http.post("/v1/embeddings", json={"model": MODEL, "input": [SENTENCES[0], long]})
    assert reply.status_code == 200, reply.text
    usage = reply.json()["usage"]
    assert usage["truncated"] == [1] and usage["max_tokens_per_input"] == minilm.MAX_SEQUENCE
    first = len(minilm.load_tokenizer()(SENTENCES[0])["input_ids"])
    assert usage["prompt_tokens"] == first + minilm.MAX_SEQUENCE
    truncated = np.asarray(reply.json()["data"][1]["embedding"], dtype=np.float32)
    np.testing.assert_array_equal(truncated, _token_embeddings(stack, [long])[0])


def test_base64_is_little_endian_float32(stack: Stack) -> None:
    with stack.http() as http:
        raw = http.post(
            "/v1/embeddings",
            json={"model": MODEL, "input": SENTENCES[0], "encoding_format": "base64"},
        )
        floats = http.post("/v1/embeddings", json={"model": MODEL, "input": SENTENCES[0]})
    decoded = np.frombuffer(base64.b64decode(raw.json()["data"][0]["embedding"]), "<f4")
    np.testing.assert_array_equal(decoded, np.asarray(floats.json()["data"][0]["embedding"]))


# --- bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        ({"model": MODEL, "input": ""}, 400, "sentence 0 is empty"),
        ({"model": MODEL, "input": ["fine", "  "]}, 400, "sentence 1 is empty"),
        ({"model": MODEL, "input": []}, 400, "0 sentences"),
        ({"model": MODEL, "input": ["x"] * 65}, 400, "65 sentences; this model takes 1 to 64"),
        ({"model": MODEL, "input": [[101, 102]]}, 400, "input"),
        ({"model": MODEL, "input": "x", "dimensions": 8}, 400, "'dimensions' is not supported"),
        ({"model": "digits", "input": "x"}, 400, "not an embedding model"),
        ({"model": "absent", "input": "x"}, 404, "not deployed"),
    ],
    ids=["empty", "blank", "none", "too-many", "token-ids", "dimensions", "classifier", "absent"],
)
def test_bad_embeddings_requests_are_clear_4xx(
    stack: Stack, body: dict[str, Any], status: int, says: str
) -> None:
    with stack.http() as http:
        reply = http.post("/v1/embeddings", json=body)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert says in error["message"]
    assert error["type"] == ("not_found_error" if status == 404 else "invalid_request_error")


def test_non_utf8_and_lone_surrogates_are_400(stack: Stack) -> None:
    header = b'{"inputs":[{"name":"text","shape":[1],"datatype":"BYTES",'
    header += b'"parameters":{"binary_data_size":6}}]}'
    with stack.http() as http:
        binary = http.post(
            f"/v2/models/{MODEL}/infer",
            content=header + b"\x02\x00\x00\x00\xff\xfe",
            headers={"Inference-Header-Content-Length": str(len(header))},
        )
        surrogate = http.post(
            "/v1/embeddings",
            content=b'{"model": "minilm", "input": "\\ud800"}',
            headers={"Content-Type": "application/json"},
        )
        digits = http.post("/v2/models/digits/infer", json=_text_request(["x"]))
    assert binary.status_code == 400 and "not valid UTF-8" in binary.json()["error"]
    assert surrogate.status_code == 400
    assert "not valid UTF-8" in surrogate.json()["error"]["message"]
    assert digits.status_code == 400 and "takes no text" in digits.json()["error"]


# --- keys, terms, limits, audit -----------------------------------------------------------


def test_embeddings_need_a_key_and_the_terms(stack: Stack) -> None:
    body = {"model": MODEL, "input": "x"}
    with https(stack.layout, stack.public.port) as http:
        anonymous = http.post("/v1/embeddings", json=body)
    with stack.http("unaccepted") as http:
        unaccepted = http.post("/v1/embeddings", json=body)
    assert anonymous.status_code == 401
    assert unaccepted.status_code == 403
    assert "/v1/terms" in unaccepted.json()["error"]["message"]


def test_limits_count_sentences_and_every_outcome_is_audited(stack: Stack) -> None:
    """A burst of 4 samples: 3 sentences pass, 2 more do not; both outcomes are audited with
    the model the body named."""
    with stack.http("burst-4") as http:
        served = http.post("/v1/embeddings", json={"model": MODEL, "input": ["a", "b", "c"]})
        refused = http.post("/v1/embeddings", json={"model": MODEL, "input": ["d", "e"]})
    assert served.status_code == 200, served.text
    assert refused.status_code == 429
    poll(lambda: len(stack.audit("burst-4")) >= 2, "two audit records")
    records = stack.audit("burst-4")
    assert [(r["model"], r["decision"], r["status"]) for r in records] == [
        (MODEL, "served", 200),
        (MODEL, "rate_limited", 429),
    ]
    assert records[0]["input_sha256"]
