"""One request's split compute in-process: the front stage, then the back stage on its
activations (FP16 transport, as served), with nothing between them. The c=1 latency target
compares splitvault's p50 with this: what is left is the cost of serving (HTTP, gRPC, TLS,
checks and protections)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from private_core.model_store import BackStage, load_back_stage
from private_core.runner import forward
from public_api.front import FrontStage, load_front_stages, run_front
from shared.batch_plan import assemble
from shared.keys import KeyProvider
from shared.layout import DeployLayout


def load_stages(
    layout: DeployLayout, provider: KeyProvider, model: str
) -> tuple[FrontStage, BackStage]:
    """``model``'s front stage from the public tier and decrypted back stage from the private."""
    front = load_front_stages(layout.public)[model]
    return front, load_back_stage(layout.private.model(model), provider)


def split_once(front: FrontStage, back: BackStage, inputs: Mapping[str, Any]) -> torch.Tensor:
    """Front then back for one request's ``inputs`` (NumPy arrays by input name)."""
    activations = run_front(front, dict(inputs))
    arrays = {**activations, **{name: inputs[name] for name in front.manifest.forward_inputs}}
    return forward(back, assemble(back.manifest, [arrays]))


def split_ms(
    front: FrontStage,
    back: BackStage,
    inputs: Mapping[str, Any],
    thread_counts: Sequence[int],
    repeats: int = 30,
) -> dict[int, float]:
    """Median ms of ``repeats`` lone requests at each torch thread count."""
    medians = {}
    for threads in thread_counts:
        torch.set_num_threads(threads)
        split_once(front, back, inputs)  # warm-up
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            split_once(front, back, inputs)
            times.append((time.perf_counter() - started) * 1000)
        medians[threads] = statistics.median(times)
    return medians
