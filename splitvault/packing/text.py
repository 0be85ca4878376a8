"""A text model's tokenizer, copied next to its front stage so that clients may send text.

The tokenizer (a ``tokenizers`` JSON file) is public: it is part of what a client of a text
model needs anyway, and holds no weights. ``pack`` checks that it loads and that every request
input of the front stage is one it fills (token ids, attention mask, token type ids).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from tokenizers import Tokenizer

from shared.manifest import DimSpec, TensorSpec, TextInput
from splitvault.errors import PackError

TOKENIZER_FILE = "tokenizer.json"
IDS, MASK, TYPE_IDS = "input_ids", "attention_mask", "token_type_ids"


def write_tokenizer(source: Path, front_dir: Path, inputs: list[TensorSpec]) -> TextInput:
    """Copy ``source`` into ``front_dir`` and describe how it fills ``inputs``."""
    try:
        Tokenizer.from_file(str(source))
    except Exception as error:
        raise PackError(
            f"the tokenizer {source} does not load",
            cause=f"{type(error).__name__}: {str(error)[:200]}",
            fix="give a tokenizers JSON file (tokenizer.json of a Hugging Face model)",
        ) from None
    by_name = {spec.name: spec for spec in inputs}
    unfilled = sorted(set(by_name) - {IDS, MASK, TYPE_IDS})
    if IDS not in by_name or unfilled:
        raise PackError(
            "the tokenizer cannot fill this model's inputs",
            cause=f"the front stage takes {sorted(by_name)}",
            fix=f"name the inputs {IDS} (and {MASK}, {TYPE_IDS} if the model takes them)",
        )
    data = source.read_bytes()
    target = front_dir / TOKENIZER_FILE
    partial = target.with_name(target.name + ".partial")
    partial.write_bytes(data)
    partial.replace(target)
    return TextInput(
        file=TOKENIZER_FILE,
        sha256=hashlib.sha256(data).hexdigest(),
        max_length=_sequence_limit(by_name[IDS]),
        ids=IDS,
        mask=MASK if MASK in by_name else None,
        type_ids=TYPE_IDS if TYPE_IDS in by_name else None,
    )


def _sequence_limit(ids: TensorSpec) -> int:
    """The most tokens a sentence may have: the front stage's largest sequence length."""
    if len(ids.shape) != 2:
        raise PackError(
            f"input {IDS} has {len(ids.shape)} dimensions",
            cause="token ids are a (batch, sequence) tensor",
            fix="give the model token ids of shape (batch, sequence)",
        )
    dim = ids.shape[1]
    return dim.max if isinstance(dim, DimSpec) else dim
