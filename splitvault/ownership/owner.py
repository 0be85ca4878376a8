"""The owner's side of a verification: the whole model, its watermark key, and candidate queries.

Run where the deployment's KEK is available (the owner's machine). Candidate inputs go through
the public front stage exactly as the public tier sends them (cast to the transport datatype),
then through the decrypted back stage, so the verifier derives for each candidate the same
canonical id, selection, watermark label and signal class the private tier used when it
answered that query.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from private_core.model_store import BackStage, ModelLoadFailure, load_back_stage
from private_core.settings import private_state_dir
from private_core.watermark.engine import eligible, region_marker
from private_core.watermark.keys import CHOICE_FILE, WATERMARK_KEY_FILE, WatermarkKey, load_key
from private_core.watermark.marks import QueryMarker, QueryMarks
from private_core.watermark.regions import top_two, unsure
from private_core.watermark.triggers import (
    TRIGGER_DIR,
    TriggerRecord,
    read_trigger_union,
    trigger_folders,
)
from shared.crypto import DecryptionError
from shared.keys import LocalFileKeyProvider
from shared.layout import DeployLayout
from shared.manifest import StageManifest, WatermarkConfig, read_config, read_manifest
from shared.tensor_codec import numpy_dtype

Arrays = dict[str, np.ndarray]
CHUNK = 256


@dataclass(frozen=True)
class RegionCandidates:
    """The candidates the model is unsure of, with their region and its selection."""

    rows: npt.NDArray[np.int64]  # indices into the distinct candidates
    ids: list[bytes]  # region id of each
    selected: npt.NDArray[np.bool_]  # its region's keyed selection bit
    runner_up: npt.NDArray[np.int64]  # the class a marked answer gave


@dataclass(frozen=True)
class Candidates:
    """Distinct candidate queries (first occurrence of each canonical id) and what the watermark
    did to them."""

    inputs: Arrays  # request inputs, one row per distinct query
    marks: QueryMarks  # ``selected`` only where ``eligible``, as the private tier decided
    eligible: npt.NDArray[np.bool_]  # queries the label watermark could select
    probabilities: npt.NDArray[np.float64]  # the model's own, unwatermarked
    received: int  # candidate rows before removing repeats
    regions: RegionCandidates | None = None  # region marks: where the test votes

    @property
    def labels(self) -> npt.NDArray[np.int64]:
        """The model's top-1 class of each query."""
        return np.asarray(self.probabilities.argmax(axis=1), dtype=np.int64)


def key_draws(private_dir: Path, key_id: str) -> int:
    """How many keys ``pack`` drew to choose the model's key ``key_id`` (1 when it left no
    record, as before keys were chosen by benign cost)."""
    path = private_dir / CHOICE_FILE
    if not path.is_file():
        return 1
    choice = json.loads(path.read_text("utf-8"))
    if choice.get("key_id") != key_id:
        return 1  # a record of a retired key: the current one was not chosen among draws
    return max(1, int(choice.get("draws", 1)))


class OwnerModel:
    """A deployed model loaded whole, for the owner: front, back, watermark key."""

    def __init__(self, deploy: Path, name: str, kek_file: Path | None = None) -> None:
        layout = DeployLayout(deploy)
        provider = LocalFileKeyProvider.load(kek_file or layout.kek)
        private_dir = layout.private.model(name)
        if not private_dir.is_dir():
            raise FileNotFoundError(f"no model {name!r} under {layout.private.models}")
        try:
            self.back: BackStage = load_back_stage(private_dir, provider)
        except ModelLoadFailure as failure:
            raise ValueError(failure.reason) from None
        try:
            self.key: WatermarkKey = load_key(private_dir / WATERMARK_KEY_FILE, provider)
        except DecryptionError as error:
            raise ValueError(f"model {name!r}: watermark key: {error.message}") from None
        self.key_draws = key_draws(private_dir, self.key.key_id)
        self.config = self.back.config
        self.settings = self.config.watermark or WatermarkConfig()
        front_dir = layout.public.model(name)
        self.front_manifest: StageManifest = read_manifest(front_dir)
        self.front = torch.export.load(front_dir / self.front_manifest.file).module()
        self.transport = read_config(front_dir).transport_datatype
        # This deployment's own trigger log, and every log found under its state folder: the
        # union of several replicas' state copied into STATE/REPLICA/ (see triggers.py).
        state = private_state_dir(deploy)
        self.trigger_dir = state / TRIGGER_DIR / name
        self.trigger_dirs = trigger_folders(state, name)
        self.name = name

    def triggers(self) -> Iterator[TriggerRecord]:
        """Every trigger record kept for this model, by every replica whose state is here."""
        return read_trigger_union(self.trigger_dirs, self.name, self.key)

    @property
    def classes(self) -> int:
        """Number of classes of the classifier."""
        spec = self.back.manifest.outputs[0]
        last = spec.shape[-1]
        if not isinstance(last, int):
            raise ValueError(f"model {self.name!r} has no fixed number of classes")
        return last

    def marker(self, fraction: float | None = None) -> QueryMarker:
        """The per-query decisions, with the configured (or a given) selected fraction."""
        return QueryMarker(self.key, fraction or self.settings.fraction)

    def read_inputs(self, path: Path) -> Arrays:
        """Candidate inputs: a ``.npy`` array (single-input models) or a ``.npz`` by name."""
        specs = self.front_manifest.inputs
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                loaded = {name: archive[name] for name in archive.files}
        else:
            if len(specs) != 1:
                raise ValueError(f"model {self.name!r} has several inputs: give a .npz by name")
            loaded = {specs[0].name: np.load(path, allow_pickle=False)}
        missing = [spec.name for spec in specs if spec.name not in loaded]
        if missing:
            raise ValueError(f"{path} lacks the inputs {missing}")
        return {
            s.name: np.ascontiguousarray(loaded[s.name], numpy_dtype(s.datatype)) for s in specs
        }

    def back_inputs(self, inputs: Arrays) -> Arrays:
        """What the public tier sends the private tier for these inputs (FP16 activations...)."""
        count = len(next(iter(inputs.values())))
        pieces: list[Arrays] = []
        for start in range(0, count, CHUNK):
            chunk = {name: array[start : start + CHUNK] for name, array in inputs.items()}
            pieces.append(self._front(chunk))
        return {name: np.concatenate([p[name] for p in pieces]) for name in pieces[0]}

    def probabilities(self, back_inputs: Arrays) -> npt.NDArray[np.float64]:
        """The model's softmax output (no watermark, no rounding)."""
        count = len(next(iter(back_inputs.values())))
        out = []
        for start in range(0, count, CHUNK):
            args = [
                torch.from_numpy(
                    np.array(
                        back_inputs[spec.name][start : start + CHUNK], numpy_dtype(spec.datatype)
                    )
                )
                for spec in self.back.manifest.inputs
            ]
            with torch.inference_mode():
                logits = self.back.module(*args)
            out.append(torch.softmax(logits.to(torch.float64), dim=-1).numpy())
        return np.concatenate(out)

    def candidates(
        self, inputs: Arrays, marker: QueryMarker, max_confidence: float | None = None
    ) -> Candidates:
        """Distinct candidate queries with the watermark's decisions and the model's output."""
        sent = self.back_inputs(inputs)
        ids = marker.query_ids(sent)
        first: dict[bytes, int] = {}
        for row, qid in enumerate(ids):
            first.setdefault(qid, row)
        keep = np.array(sorted(first.values()), dtype=np.int64)
        kept = {name: array[keep] for name, array in sent.items()}
        probabilities = self.probabilities(kept)
        uncertain = eligible(probabilities, max_confidence or self.settings.max_confidence)
        marks = marker.marks(kept)
        selected = marks.selected & uncertain
        regions = self.region_candidates(kept, probabilities)
        if regions is not None:  # what the private tier marked (and logged)
            selected = np.zeros(len(keep), dtype=bool)
            selected[regions.rows] = regions.selected
        return Candidates(
            inputs={name: array[keep] for name, array in inputs.items()},
            marks=replace(marks, selected=selected),
            eligible=uncertain,
            probabilities=probabilities,
            received=len(ids),
            regions=regions,
        )

    def region_candidates(
        self, back_inputs: Arrays, probabilities: npt.NDArray[np.float64]
    ) -> RegionCandidates | None:
        """Region ids and selection of the unsure candidates (``None`` with per-query marks).

        Uses the partition and selection subkeys only."""
        if self.settings.marks != "region":
            return None
        rows = np.flatnonzero(unsure(probabilities, self.settings.max_margin))
        pairs = top_two(probabilities[rows])
        marker = region_marker(self.key, self.settings)
        ids = marker.regions({n: a[rows] for n, a in back_inputs.items()}, pairs)
        return RegionCandidates(rows, ids, marker.selected(ids), pairs[:, 1])

    def _front(self, inputs: Arrays) -> Arrays:
        args = [torch.from_numpy(inputs[spec.name]) for spec in self.front_manifest.inputs]
        with torch.inference_mode():
            outputs: Any = self.front(*args)
        if isinstance(outputs, torch.Tensor):
            outputs = (outputs,)
        transport = numpy_dtype(self.transport)
        result: Arrays = {}
        for spec, tensor in zip(self.front_manifest.outputs, outputs, strict=True):
            array = tensor.numpy()
            result[spec.name] = array.astype(transport) if array.dtype.kind == "f" else array
        for name in self.front_manifest.forward_inputs:
            result[name] = inputs[name]
        return result
