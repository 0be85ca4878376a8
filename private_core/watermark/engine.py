"""A loaded model's watermark: its settings, key, per-query decisions and trigger log."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from private_core.watermark.keys import WatermarkKey
from private_core.watermark.marks import QueryMarker, QueryMarks, watermark_labels
from private_core.watermark.regions import RegionMarker, top_two, unsure
from private_core.watermark.trigger_queue import PendingRequest, TriggerQueue
from private_core.watermark.triggers import TriggerLog
from shared.manifest import ModelConfig, WatermarkConfig

Scheme = Literal["label", "signal"]


def eligible(
    probabilities: npt.NDArray[np.float64], max_confidence: float
) -> npt.NDArray[np.bool_]:
    """Queries the label watermark may select: top-1 probability below ``max_confidence``.

    Where the model is unsure, a wrong label costs less accuracy (the model is often wrong
    there anyway) and a copy learns it more readily (its boundary moves only a little).
    """
    if max_confidence >= 1.0:
        return np.ones(len(probabilities), dtype=bool)
    return np.asarray(probabilities.max(axis=1) < max_confidence, dtype=bool)


def resolve_scheme(config: WatermarkConfig) -> Scheme:
    """``auto`` means the label watermark (it marks every classifier policy)."""
    return "signal" if config.scheme == "signal" else "label"


@dataclass(frozen=True)
class QueryContext:
    """Who asked: the request id and API key id the public tier sent (empty if none), and how
    the key id is known: ``public`` (asserted by the public tier alone) or ``signed`` (by the
    customer's registered key, verified here; ``signature`` keeps what was verified)."""

    request_id: str = ""
    key_id: str = ""
    attribution: str = "public"
    signature: Mapping[str, str] | None = None

    @classmethod
    def of(cls, request: Any) -> QueryContext:
        """From an ``InferRequest`` (``key_id`` only where the proto carries it)."""
        return cls(
            str(getattr(request, "request_id", "") or ""), str(getattr(request, "key_id", "") or "")
        )


@dataclass(frozen=True)
class Marking:
    """What the output policy needs to watermark one request's answer."""

    scheme: Scheme
    marks: QueryMarks
    amplitude: float
    runner_up: npt.NDArray[np.int64] | None = None  # region marks: the class answered

    def rows(self, start: int, stop: int) -> Marking:
        """The decisions of samples ``start:stop`` (one request of a batch marked together)."""
        marks = self.marks
        return replace(
            self,
            marks=QueryMarks(
                marks.ids[start:stop],
                marks.selected[start:stop],
                marks.offsets[start:stop],
                marks.signal_offsets[start:stop],
            ),
            runner_up=None if self.runner_up is None else self.runner_up[start:stop],
        )

    def labels(self, top1: npt.NDArray[np.int64], classes: int) -> npt.NDArray[np.int64]:
        """The label answered for each selected sample (region: the runner-up)."""
        if self.runner_up is not None:
            return self.runner_up
        return watermark_labels(top1, self.marks.offsets, classes)


def region_marker(key: WatermarkKey, settings: WatermarkConfig) -> RegionMarker:
    """The region partition and selection of ``settings`` under ``key``."""
    return RegionMarker(key, settings.region_fraction, settings.region_dims, settings.region_cell)


class ModelWatermark:
    """Marks a model's answers and keeps its trigger set."""

    def __init__(
        self, config: ModelConfig, key: WatermarkKey, trigger_dir: Path | None = None
    ) -> None:
        if config.watermark is None:
            raise ValueError(f"model {config.name!r} has no watermark settings")
        self.model, self.settings, self.key = config.name, config.watermark, key
        self.scheme = resolve_scheme(self.settings)
        self.marker = QueryMarker(key, self.settings.fraction)
        self.regions = region_marker(key, self.settings)
        self.triggers = (
            None
            if trigger_dir is None
            else TriggerQueue(
                TriggerLog(
                    trigger_dir / config.name,
                    config.name,
                    key,
                    self.settings.trigger_max_records,
                    self.settings.trigger_max_bytes,
                )
            )
        )

    def marking(self, inputs: Mapping[str, Any], probabilities: npt.NDArray[np.float64]) -> Marking:
        """The decisions for one request's samples; ``probabilities`` are the model's own."""
        marks = self.marker.marks(inputs)
        if self.scheme == "label" and self.settings.marks == "region":
            pairs = top_two(probabilities)
            chosen = self.regions.selected(self.regions.regions(inputs, pairs))
            selected = chosen & unsure(probabilities, self.settings.max_margin)
            marking = Marking(self.scheme, replace(marks, selected=selected), 0.0, pairs[:, 1])
            return marking
        if self.scheme == "label":
            uncertain = eligible(probabilities, self.settings.max_confidence)
            marks = replace(marks, selected=marks.selected & uncertain)
        return Marking(self.scheme, marks, self.settings.amplitude)

    def record(
        self,
        marking: Marking,
        inputs: Mapping[str, Any],
        top1: npt.NDArray[np.int64],
        answered: npt.NDArray[np.int64],
        context: QueryContext | None,
    ) -> int:
        """Queue one label-watermarked request for the trigger log, marked rows or not (the
        same work either way: see ``trigger_queue``); returns how many rows are marked."""
        if self.triggers is None or marking.scheme != "label":
            return 0
        context = context or QueryContext()
        self.triggers.submit(
            PendingRequest(
                time.time(),
                context.request_id,
                context.key_id,
                marking.marks.ids,
                marking.marks.selected,
                top1,
                answered,
                inputs,
                attribution=context.attribution,
                signature=dict(context.signature or {}),
            )
        )
        return int(marking.marks.selected.sum())

    def close(self) -> None:
        """Write the queued trigger records and stop their writer."""
        if self.triggers is not None:
            self.triggers.close()
