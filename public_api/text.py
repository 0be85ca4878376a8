"""Text in, for text models: sentences (a v2 ``BYTES`` input) tokenized into the front's inputs.

A model packed with its tokenizer (``shared.manifest.TextInput``) takes an input ``text`` of
UTF-8 strings, one sentence per sample, instead of its token-id inputs. Each sentence is
truncated to the model's maximum length (the answer says which were) and the batch is padded
to its longest sentence. Cost: one sentence is one sample, as one row of token ids is.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from public_api.v2 import RequestInput
from shared.errors import InvalidInput
from shared.logs import get_logger
from shared.manifest import StageManifest, TextInput
from shared.tensor_codec import elements_from_bytes, numpy_dtype

log = get_logger(__name__)
TEXT_INPUT = "text"
# A sentence longer than max_length times this many characters is cut before it is tokenized
# (and reported truncated): no token of a WordPiece or BPE vocabulary is longer, so only a
# sentence that would be truncated anyway is cut, and a huge one costs no tokenizer time.
CHARS_PER_TOKEN = 100


@dataclass(frozen=True)
class TextUsage:
    """What the tokenizer made of a request: tokens per sentence (special tokens included,
    padding not) and the sentences cut to ``max_length`` tokens."""

    tokens: list[int]
    truncated: list[int]  # indices of the sentences that were truncated
    max_length: int

    @property
    def total(self) -> int:
        """Tokens of the whole request."""
        return sum(self.tokens)


@dataclass(frozen=True)
class EncodedText:
    """Token arrays by front-stage input name, and what the tokenizer did."""

    arrays: dict[str, Any]
    usage: TextUsage


class TextEncoder:
    """One model's tokenizer, set to truncate at its maximum length and pad to the longest."""

    def __init__(self, tokenizer: Tokenizer, spec: TextInput, dtypes: Mapping[str, Any]) -> None:
        """``dtypes``: the NumPy dtype of each front-stage input."""
        self.spec = spec
        self._dtypes = dict(dtypes)
        padding = tokenizer.padding or {}
        tokenizer.enable_truncation(spec.max_length)
        tokenizer.enable_padding(  # to the longest of the batch (the file may say a fixed size)
            pad_id=padding.get("pad_id", 0), pad_token=padding.get("pad_token", "[PAD]")
        )
        self._tokenizer = tokenizer

    @classmethod
    def load(cls, folder: Path, manifest: StageManifest) -> TextEncoder | None:
        """The encoder of a front stage packed with a tokenizer (checked against its digest)."""
        spec = manifest.text
        if spec is None:
            return None
        data = (folder / spec.file).read_bytes()
        if hashlib.sha256(data).hexdigest() != spec.sha256:
            raise ValueError(f"{spec.file} does not match the sha256 in the manifest")
        dtypes = {item.name: numpy_dtype(item.datatype) for item in manifest.inputs}
        return cls(Tokenizer.from_str(data.decode("utf-8")), spec, dtypes)

    def encode(self, sentences: list[str]) -> EncodedText:
        """Token arrays for ``sentences`` (checked by ``sentences_of``)."""
        limit = self.spec.max_length * CHARS_PER_TOKEN
        cut = {i for i, sentence in enumerate(sentences) if len(sentence) > limit}
        encodings = self._tokenizer.encode_batch([sentence[:limit] for sentence in sentences])
        truncated = [i for i, found in enumerate(encodings) if found.overflowing or i in cut]
        arrays = {self.spec.ids: self._array(self.spec.ids, [e.ids for e in encodings])}
        if self.spec.mask is not None:
            masks = [e.attention_mask for e in encodings]
            arrays[self.spec.mask] = self._array(self.spec.mask, masks)
        if self.spec.type_ids is not None:
            types = [e.type_ids for e in encodings]
            arrays[self.spec.type_ids] = self._array(self.spec.type_ids, types)
        tokens = [sum(e.attention_mask) for e in encodings]
        return EncodedText(arrays, TextUsage(tokens, truncated, self.spec.max_length))

    def _array(self, name: str, rows: list[list[int]]) -> Any:
        return np.asarray(rows, dtype=self._dtypes[name])


def load_text_encoders(
    models_dir: Path, manifests: Mapping[str, StageManifest]
) -> dict[str, TextEncoder]:
    """The encoder of every model packed with a tokenizer; one that does not load is logged
    and left out (its model then takes token ids only)."""
    encoders: dict[str, TextEncoder] = {}
    for model, manifest in manifests.items():
        try:
            encoder = TextEncoder.load(models_dir / model, manifest)
        except Exception as error:  # a bad tokenizer must not stop the tier
            log.error("tokenizer_load_failed", model=model, error=type(error).__name__)
            continue
        if encoder is not None:
            encoders[model] = encoder
            log.info("tokenizer_loaded", model=model, max_length=encoder.spec.max_length)
    return encoders


def sentences_of(item: RequestInput, raw: bytes | memoryview | None, limit: int) -> list[str]:
    """The sentences of a ``BYTES`` input (JSON strings, or raw with the binary extension):
    at least one, at most ``limit``, each non-empty, valid UTF-8 (400 otherwise)."""
    if item.datatype != "BYTES":
        raise InvalidInput(f"input {TEXT_INPUT!r} must be BYTES (UTF-8 strings)")
    if len(item.shape) not in (1, 2) or (len(item.shape) == 2 and item.shape[1] != 1):
        raise InvalidInput(f"input {TEXT_INPUT!r} must have shape [N] or [N, 1]")
    count = item.shape[0]
    if not 1 <= count <= limit:
        raise InvalidInput(f"{count} sentences; this model takes 1 to {limit} per request")
    elements = _elements(item, raw)
    if len(elements) != count:
        raise InvalidInput(f"shape {item.shape} needs {count} sentences; {len(elements)} sent")
    return [_sentence(i, element) for i, element in enumerate(elements)]


def _elements(item: RequestInput, raw: bytes | memoryview | None) -> list[Any]:
    if raw is not None:
        return list(elements_from_bytes(raw))
    if item.data is None:
        raise InvalidInput(f"input {TEXT_INPUT!r} has no data (and no binary_data_size)")
    flat: list[Any] = []
    for element in item.data:
        flat += element if isinstance(element, list) else [element]
    return flat


def _sentence(index: int, element: Any) -> str:
    """One sentence, decoded and checked; the message names it by index."""
    if isinstance(element, bytes):
        try:
            element = element.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidInput(f"sentence {index} is not valid UTF-8") from None
    if not isinstance(element, str):
        raise InvalidInput(f"sentence {index} is not a string")
    try:
        element.encode("utf-8")  # JSON may carry lone surrogates ("\ud800"), not UTF-8
    except UnicodeEncodeError:
        raise InvalidInput(f"sentence {index} is not valid UTF-8 (a lone surrogate)") from None
    if not element.strip():
        raise InvalidInput(f"sentence {index} is empty")
    return element
