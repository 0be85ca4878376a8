"""``pack`` copies a text model's tokenizer only when it can fill the model's inputs."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.manifest import DimSpec, TensorSpec
from splitvault.demo import minilm
from splitvault.errors import PackError
from splitvault.packing.text import write_tokenizer

TOKENIZER = Path(minilm.model_path()) / "tokenizer.json"
DIMS = [DimSpec(name="batch", min=1, max=4), DimSpec(name="seq", min=1, max=128)]


def _spec(name: str) -> TensorSpec:
    return TensorSpec(name=name, datatype="INT64", shape=list(DIMS))


def test_the_tokenizer_is_copied_with_its_digest_and_the_inputs_it_fills(tmp_path: Path) -> None:
    text = write_tokenizer(TOKENIZER, tmp_path, [_spec("input_ids"), _spec("token_type_ids")])
    assert (tmp_path / "tokenizer.json").read_bytes() == TOKENIZER.read_bytes()
    assert (text.ids, text.mask, text.type_ids, text.max_length) == (
        "input_ids", None, "token_type_ids", 128,
    )  # fmt: skip


def test_a_model_with_inputs_the_tokenizer_cannot_fill_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PackError, match="cannot fill"):
        write_tokenizer(TOKENIZER, tmp_path, [_spec("input_ids"), _spec("pixel_values")])
    assert not (tmp_path / "tokenizer.json").exists()


def test_a_file_that_is_not_a_tokenizer_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"not": "a tokenizer"}')
    with pytest.raises(PackError, match="does not load"):
        write_tokenizer(bad, tmp_path / "out", [_spec("input_ids")])
