"""What both baseline servers share: the unsplit demo models and a v2-shaped JSON body.

A request is ``{"inputs": [{"name", "shape", "datatype", "data"}]}`` (the same tensors and
sizes splitvault's v2 endpoint takes); an answer carries the top-3 probabilities and class
indices (digits) or the sentence embedding (MiniLM) as plain JSON lists.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

TOP_K = 3
_DTYPES = {"FP32": np.float32, "FP16": np.float16, "INT64": np.int64, "INT32": np.int32}


@dataclass(frozen=True)
class ServedModel:
    """An unsplit model: its input names and how to turn a batch's output into answers."""

    name: str
    module: torch.nn.Module
    inputs: tuple[str, ...]
    answer: Callable[[torch.Tensor], dict[str, Any]]

    def forward(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """One forward pass without autograd."""
        with torch.inference_mode():
            output: torch.Tensor = self.module(*(tensors[name] for name in self.inputs))
        return output


def load_models(digits_state: Path | None, minilm: bool, threads: int) -> dict[str, ServedModel]:
    """The digits CNN from a saved state dict and/or the pretrained MiniLM embedder."""
    torch.set_num_threads(threads)
    models: dict[str, ServedModel] = {}
    if digits_state is not None:
        from splitvault.demo.digits import DigitsCNN

        cnn = DigitsCNN()
        cnn.load_state_dict(torch.load(digits_state, weights_only=True))
        models["digits"] = ServedModel("digits", cnn.eval(), ("image",), _topk_answer)
    if minilm:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from splitvault.demo import minilm as demo_minilm

        embedder = demo_minilm.load_model()
        inputs = ("input_ids", "attention_mask")
        models["minilm"] = ServedModel("minilm", embedder, inputs, _embedding_answer)
    return models


def tensors_from_body(body: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The input tensors of a v2-shaped JSON body (``ValueError`` when malformed)."""
    tensors: dict[str, torch.Tensor] = {}
    for item in body.get("inputs") or []:
        dtype = _DTYPES.get(str(item.get("datatype")))
        if dtype is None:
            raise ValueError(f"unsupported datatype {item.get('datatype')!r}")
        array = np.asarray(item["data"], dtype=dtype).reshape(item["shape"])
        tensors[str(item["name"])] = torch.from_numpy(array)
    if not tensors:
        raise ValueError("the body has no inputs")
    return tensors


def concat_batch(requests: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Requests stacked along the batch dimension; sequences right-padded with zeros."""
    merged: dict[str, torch.Tensor] = {}
    for name in requests[0]:
        parts = [request[name] for request in requests]
        longest = max(part.shape[-1] for part in parts) if parts[0].dim() == 2 else None
        if longest is not None:
            parts = [torch.nn.functional.pad(p, (0, longest - p.shape[-1])) for p in parts]
        merged[name] = torch.cat(parts)
    return merged


def _topk_answer(logits: torch.Tensor) -> dict[str, Any]:
    scores, indices = torch.topk(torch.softmax(logits, dim=-1), TOP_K, dim=-1)
    return {
        "outputs": [
            {"name": "scores", "shape": list(scores.shape), "data": scores.ravel().tolist()},
            {"name": "indices", "shape": list(indices.shape), "data": indices.ravel().tolist()},
        ]
    }


def _embedding_answer(embedding: torch.Tensor) -> dict[str, Any]:
    return {
        "outputs": [
            {
                "name": "embedding",
                "shape": list(embedding.shape),
                "data": embedding.ravel().tolist(),
            }
        ]
    }
