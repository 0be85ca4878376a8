"""The watermark key drawn at pack: bounded in benign cost when the owner gives labelled data.

With ``ModelSpec.benign_inputs`` and ``benign_labels``, each drawn key's benign cost is measured
on that data as the private tier would answer it (front stage, the transport datatype, back
stage, ``private_core.watermark.benign``), and keys are redrawn up to ``MAX_DRAWS`` times until
one costs at most ``BOUND`` (0.25 %). Without such data the first key drawn is kept, as before,
and the log says its cost was not checked. Either way ``watermark.choice.json`` next to the key
records how many keys were drawn: a claim's p-value is at most that many times the one reported.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from private_core.watermark.benign import BOUND, MAX_DRAWS, BenignChunk, choose_key
from private_core.watermark.keys import CHOICE_FILE, WatermarkKey
from shared.logs import get_logger
from shared.manifest import ModelConfig
from shared.tensor_codec import numpy_dtype
from splitvault.packing.spec import BenignData
from splitvault.packing.split import StagePair

log = get_logger(__name__)

CHUNK = 256  # samples per forward pass


def key_drawer(
    pair: StagePair, config: ModelConfig, data: BenignData | None, back_dir: Path
) -> Callable[[], WatermarkKey]:
    """What draws the model's watermark key: cost-bounded on ``data`` where it can be; the draw
    is recorded in ``back_dir / CHOICE_FILE``."""
    if config.watermark is None or data is None:
        reason = "watermark off" if config.watermark is None else "no labelled benign data"
        return lambda: _unchecked(config.name, reason, back_dir)
    return lambda: _bounded(pair, config, data, back_dir)


def _unchecked(model: str, reason: str, back_dir: Path) -> WatermarkKey:
    log.info("watermark_key_unchecked", model=model, reason=reason)
    key = WatermarkKey.generate()
    _record(back_dir, {"key_id": key.key_id, "draws": 1, "checked": False, "reason": reason})
    return key


def _bounded(
    pair: StagePair, config: ModelConfig, data: BenignData, back_dir: Path
) -> WatermarkKey:
    chunks = benign_chunks(pair, config, data)
    choice = choose_key(config, chunks, bound=BOUND, max_draws=MAX_DRAWS)
    samples = sum(len(c.labels) for c in chunks)
    log.info(
        "watermark_key_chosen",
        model=config.name,
        key_id=choice.key.key_id,
        benign_cost=round(choice.cost, 5),
        draws=choice.draws,
        samples=samples,
    )
    record = {"key_id": choice.key.key_id, "draws": choice.draws, "checked": True}
    record.update(bound=BOUND, benign_cost=choice.cost, costs=list(choice.costs), samples=samples)
    _record(back_dir, record)
    return choice.key


def _record(back_dir: Path, choice: dict[str, object]) -> None:
    """How the key was drawn; ``draws`` is the factor a claim's p-value may be inflated by."""
    (back_dir / CHOICE_FILE).write_text(json.dumps(choice, indent=2) + "\n")


def benign_chunks(pair: StagePair, config: ModelConfig, data: BenignData) -> list[BenignChunk]:
    """``data`` as the private tier receives and computes it, in chunks of ``CHUNK``."""
    front, back = pair.front.module(), pair.back.module()
    wire = numpy_dtype(config.transport_datatype)
    labels = data.labels.numpy().astype(np.int64)
    chunks = []
    with torch.inference_mode():
        for start in range(0, len(labels), CHUNK):
            request = {n: t[start : start + CHUNK] for n, t in data.inputs.items()}
            outputs = front(*(request[name] for name in pair.request_inputs))
            produced = dict(zip(pair.front_outputs, outputs, strict=True))
            received: dict[str, np.ndarray] = {}
            args: list[torch.Tensor] = []
            for wired in pair.back_inputs:
                kind, _, name = wired.source.partition(":")
                tensor = produced[name] if kind == "front" else request[name]
                if tensor.is_floating_point():
                    sent = tensor.numpy().astype(wire)
                    received[wired.name] = sent
                    args.append(torch.from_numpy(sent).to(tensor.dtype))
                else:
                    received[wired.name] = tensor.numpy()
                    args.append(tensor)
            output = back(*args)
            chunks.append(BenignChunk(received, output, labels[start : start + CHUNK]))
    return chunks
