"""``[front_batching]`` in public.toml: how concurrent front-stage calls of a model are batched."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class FrontBatchLimits(BaseModel):
    """One model's own batch limits (None: the tier's)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_batch_size: int | None = Field(default=None, ge=1, le=4096)
    max_queue_delay_us: int | None = Field(default=None, ge=0, le=1_000_000)


class FrontBatchSettings(BaseModel):
    """Dynamic batching of front stages (``shared/batcher.py``, as the private tier's back
    stages): rows per call (None: each model's own ``max_batch_size``, which always caps it),
    how long the oldest queued request may wait for its batch to fill while another batch of the
    model runs (a request finding the model idle starts at once), rows allowed to wait per model
    before requests are refused as overloaded (503), batches of one model running at once, and
    zero-padding of dims that pad exactly (MiniLM's ``seq``, checked per model at startup).
    ``models``: limits per model name. ``max_batch_size=1``: no batching. Front stages cheap
    enough to run on the event loop (``front_inline_below_ms``) are never queued."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # 8, not the model's limit: on the shared benchmark host, batches of up to 64 MiniLM rows left
    # the tier in bursts (p99 1.25x unbatched); batches of 8 did better (BENCHMARKS.md, issue 17).
    max_batch_size: int | None = Field(default=8, ge=1, le=4096)
    max_queue_delay_us: int = Field(default=2000, ge=0, le=1_000_000)
    max_queue_size: int = Field(default=512, ge=1)
    concurrent_batches: int = Field(default=2, ge=1, le=64)
    pad_batches: bool = True
    models: dict[str, FrontBatchLimits] = Field(default_factory=dict)
