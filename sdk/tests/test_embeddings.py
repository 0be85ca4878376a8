"""``embed``: the ``/v1/embeddings`` request the clients build and the answer they parse."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

from splitvault_client import ProtocolError
from splitvault_client._embeddings import embeddings_call, parse_embeddings


def test_one_sentence_or_many_go_as_a_list() -> None:
    for sentences in ("été", ["été"]):
        call = embeddings_call("minilm", sentences)
        assert (call.method, call.path) == ("POST", "/v1/embeddings")
        assert call.body is not None
        assert json.loads(call.body) == {"model": "minilm", "input": ["été"]}


@pytest.mark.parametrize("sentences", [[], [1], None])
def test_anything_but_strings_is_refused_before_sending(sentences: object) -> None:
    with pytest.raises(TypeError):
        embeddings_call("minilm", sentences)  # type: ignore[arg-type]


def test_the_answer_is_parsed_in_index_order() -> None:
    answer = {
        "object": "list",
        "model": "minilm",
        "data": [
            {"object": "embedding", "index": 1, "embedding": [0.0, 1.0]},
            {"object": "embedding", "index": 0, "embedding": [1.0, 0.0]},
        ],
        "usage": {
            "prompt_tokens": 9,
            "total_tokens": 9,
            "truncated": [1],
            "max_tokens_per_input": 512,
        },
    }
    result = parse_embeddings(httpx.Response(200, json=answer))
    np.testing.assert_array_equal(result.vectors, [[1.0, 0.0], [0.0, 1.0]])
    assert result.vectors.dtype == np.float32
    assert (result.prompt_tokens, result.truncated, result.max_tokens_per_input) == (9, (1,), 512)


def test_an_answer_that_is_not_embeddings_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError):
        parse_embeddings(httpx.Response(200, json={"outputs": []}))
