"""Text in: the tokenizer as the public tier sets it up, and the checks on sentences."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from public_api.text import CHARS_PER_TOKEN, TextEncoder, sentences_of
from public_api.v2 import RequestInput
from shared.errors import InvalidInput
from shared.manifest import TextInput
from shared.tensor_codec import bytes_tensor, elements_from_bytes
from splitvault.demo import minilm
from splitvault.packing.text import write_tokenizer

TOKENIZER = Path(minilm.model_path()) / "tokenizer.json"
INT64 = np.dtype("<i8")


def _encoder(max_length: int = 16) -> TextEncoder:
    from tokenizers import Tokenizer

    spec = TextInput(sha256="0" * 64, max_length=max_length, ids="input_ids", mask="attention_mask")
    dtypes = {"input_ids": INT64, "attention_mask": INT64}
    return TextEncoder(Tokenizer.from_file(str(TOKENIZER)), spec, dtypes)


def _text(data: list[object] | None, shape: list[int] | None = None) -> RequestInput:
    size = [len(data or [])] if shape is None else shape
    return RequestInput(name="text", shape=size, datatype="BYTES", data=data)


def test_tokens_match_the_models_own_tokenizer_padded_to_the_longest() -> None:
    sentences = ["Hello world.", "A much longer sentence about guitars on stage."]
    encoded = _encoder(64).encode(sentences)
    reference = minilm.tokenize(sentences)
    for name in ("input_ids", "attention_mask"):
        np.testing.assert_array_equal(encoded.arrays[name], reference[name].numpy())
    assert encoded.arrays["input_ids"].dtype == INT64
    assert encoded.usage.tokens == reference["attention_mask"].sum(dim=1).tolist()
    assert encoded.usage.truncated == []


def test_a_long_sentence_is_truncated_and_reported() -> None:
    encoded = _encoder(16).encode(["short", "word " * 40])
    assert encoded.arrays["input_ids"].shape == (2, 16)
    assert encoded.usage.tokens == [3, 16] and encoded.usage.truncated == [1]
    assert encoded.usage.total == 19


def test_a_huge_sentence_is_cut_before_tokenizing_and_reported() -> None:
    encoded = _encoder(4).encode(["x" * (4 * CHARS_PER_TOKEN + 1)])
    assert encoded.usage.truncated == [0]


def test_sentences_come_from_json_or_raw_bytes() -> None:
    assert sentences_of(_text(["a", "b"]), None, 8) == ["a", "b"]
    assert sentences_of(_text([["a"], ["b"]], [2, 1]), None, 8) == ["a", "b"]
    raw = bytes_tensor(["été", "b"])
    assert sentences_of(_text(None, [2]), raw, 8) == ["été", "b"]


@pytest.mark.parametrize(
    ("item", "raw", "says"),
    [
        (_text(["a", ""]), None, "sentence 1 is empty"),
        (_text([" \n"]), None, "sentence 0 is empty"),
        (_text([3]), None, "sentence 0 is not a string"),
        (_text(["\ud800"]), None, "not valid UTF-8"),
        (_text(None, [1]), b"\x02\x00\x00\x00\xff\xfe", "not valid UTF-8"),
        (_text(["a"] * 9), None, "9 sentences; this model takes 1 to 8"),
        (_text([]), None, "0 sentences"),
        (_text(["a"], [2]), None, "needs 2 sentences; 1 sent"),
        (_text(["a", "b"], [1, 2]), None, r"shape \[N\] or \[N, 1\]"),
        (RequestInput(name="text", shape=[1], datatype="INT64", data=[1]), None, "BYTES"),
        (_text(None, [1]), None, "no data"),
    ],
    ids=[
        "empty", "blank", "number", "surrogate", "binary-not-utf8", "too-many", "none",
        "count", "shape", "datatype", "no-data",
    ],
)  # fmt: skip
def test_bad_sentences_are_refused(item: RequestInput, raw: bytes | None, says: str) -> None:
    with pytest.raises(InvalidInput, match=says):
        sentences_of(item, raw, 8)


def test_raw_bytes_elements_round_trip_and_refuse_cut_data() -> None:
    data = bytes_tensor(["a", "", "ccc"])
    assert elements_from_bytes(data) == [b"a", b"", b"ccc"]
    with pytest.raises(InvalidInput, match="runs past the end"):
        elements_from_bytes(data[:-1])
    with pytest.raises(InvalidInput, match="inside an element's length"):
        elements_from_bytes(data + b"\x01\x00")


def test_the_encoder_refuses_a_tokenizer_that_does_not_match_its_digest(tmp_path: Path) -> None:
    from shared.manifest import DimSpec, StageManifest, TensorSpec

    seq: list[int | DimSpec] = [
        DimSpec(name="batch", min=1, max=8),
        DimSpec(name="seq", min=1, max=32),
    ]
    specs = [
        TensorSpec(name=n, datatype="INT64", shape=seq) for n in ("input_ids", "attention_mask")
    ]
    text = write_tokenizer(TOKENIZER, tmp_path, specs)
    assert text.max_length == 32 and text.mask == "attention_mask" and text.type_ids is None
    manifest = StageManifest(
        model="m", stage="front", file="f", encrypted=False, sha256="0", inputs=specs,
        outputs=[], tiers={}, torch_version="x", text=text,
    )  # fmt: skip
    assert TextEncoder.load(tmp_path, manifest) is not None
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match="does not match the sha256"):
        TextEncoder.load(tmp_path, manifest)
