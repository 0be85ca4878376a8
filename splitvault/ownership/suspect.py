"""Suspect models: asked for their class ranking of the candidate inputs.

A suspect is either a v2 REST endpoint (queried with the splitvault SDK, which speaks the Open
Inference Protocol's classification extension) or a local model file: a ``torch.export``
program (``.pt2``) or a TorchScript file (anything else). Loading a ``.pt2`` file unpickles:
open a suspect's file only in a sandbox you are prepared to lose.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import torch

Arrays = dict[str, np.ndarray]
REST_BATCH = 64
LOCAL_BATCH = 256


class Suspect(Protocol):
    """Anything that ranks classes for a batch of request inputs."""

    description: str

    def rank(self, inputs: Arrays) -> npt.NDArray[np.int64]:
        """``(n, k)`` class indices, best first (``k`` >= 1)."""
        ...


class LocalSuspect:
    """A model file run in this process; its output is read as logits, one row per input.

    A ``.pt2`` program exported for a fixed batch size is fed batches of that size (the last
    one padded).
    """

    def __init__(self, path: Path, input_names: list[str]) -> None:
        if not path.is_file():
            raise FileNotFoundError(f"no suspect model file {path}")
        self.description = str(path)
        self.input_names = input_names
        self.batch, self.fixed = LOCAL_BATCH, False
        if path.suffix == ".pt2":
            program = torch.export.load(path)
            self.module: Any = program.module()
            fixed = _fixed_batch(program)
            if fixed is not None:
                self.batch, self.fixed = fixed, True
        else:
            self.module = torch.jit.load(str(path), map_location="cpu")  # type: ignore[no-untyped-call]

    def rank(self, inputs: Arrays) -> npt.NDArray[np.int64]:
        """Every class, ordered by the suspect's output."""
        count = len(inputs[self.input_names[0]])
        ranked = []
        for start in range(0, count, self.batch):
            chunk = [inputs[n][start : start + self.batch] for n in self.input_names]
            size = len(chunk[0])
            if self.fixed and size < self.batch:
                chunk = [
                    np.concatenate([a, np.repeat(a[-1:], self.batch - size, 0)]) for a in chunk
                ]
            with torch.inference_mode():
                out = self.module(*[torch.from_numpy(np.ascontiguousarray(a)) for a in chunk])
            logits = out[0] if isinstance(out, tuple | list) else out
            ranked.append(
                np.argsort(-logits.to(torch.float64).numpy()[:size], axis=1, kind="stable")
            )
        return np.concatenate(ranked).astype(np.int64)


def _fixed_batch(program: Any) -> int | None:
    """The batch size a program was exported for, or None when the batch is dynamic."""
    users = set(program.graph_signature.user_inputs)
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in users:
            shape = getattr(node.meta.get("val"), "shape", None)
            if shape is not None and len(shape) and isinstance(shape[0], int):
                return int(shape[0])
            return None
    return None


class RestSuspect:
    """A v2 REST endpoint, asked for its top ``top_k`` classes in batches of 64."""

    def __init__(
        self, url: str, model: str, *, api_key: str | None, ca: Path | None, top_k: int
    ) -> None:
        from splitvault_client import Client

        self.description = f"{url} (model {model!r})"
        self.model, self.top_k = model, top_k
        self.client = Client(url, api_key=api_key, ca=ca, timeout=60.0, retries=2)

    def rank(self, inputs: Arrays) -> npt.NDArray[np.int64]:
        """The endpoint's top-k indices for each input."""
        count = len(next(iter(inputs.values())))
        ranked = []
        for start in range(0, count, REST_BATCH):
            batch = {name: array[start : start + REST_BATCH] for name, array in inputs.items()}
            ranked.append(self._predict(batch))
        return np.concatenate(ranked).astype(np.int64)

    def _predict(self, batch: Arrays) -> npt.NDArray[np.int64]:
        from splitvault_client import RateLimited

        single = next(iter(batch.values())) if len(batch) == 1 else None
        while True:
            try:
                prediction = self.client.predict(
                    self.model, single if single is not None else batch, top_k=self.top_k
                )
                break
            except RateLimited as error:
                time.sleep(error.retry_after or 1.0)
        if prediction.indices is None:
            raise ValueError(f"{self.description} did not answer with classes")
        return np.asarray(prediction.indices, dtype=np.int64)

    def close(self) -> None:
        """Close the HTTP client."""
        self.client.close()


def open_suspect(
    spec: str,
    *,
    model: str,
    input_names: list[str],
    api_key: str | None = None,
    ca: Path | None = None,
    top_k: int = 10,
) -> LocalSuspect | RestSuspect:
    """A REST suspect for an ``http(s)://`` URL, else a local model file."""
    if spec.startswith(("http://", "https://")):
        return RestSuspect(spec, model, api_key=api_key, ca=ca, top_k=top_k)
    return LocalSuspect(Path(spec), input_names)
