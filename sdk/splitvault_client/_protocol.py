"""Open Inference Protocol v2 over REST, with no I/O: both clients build and read requests here.

A ``Call`` says what to send (``_outcomes`` says what came back amounts to). The ``parse_*``
functions turn successful responses into result objects.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar
from urllib.parse import quote

import httpx
import numpy as np
import numpy.typing as npt

from ._exceptions import ProtocolError
from ._types import ModelMetadata, Prediction, Task, TensorSpec, Terms, TermsAcceptance

__version__ = "0.1.0"

Inputs = npt.NDArray[Any] | Mapping[str, npt.NDArray[Any]]
T = TypeVar("T")

_OK = frozenset({200})
_HEALTH = frozenset({200, 503})  # 503 answers "not ready"; it is not a failure of the call
_DATATYPE_BY_KIND_SIZE = {
    ("b", 1): "BOOL",
    ("u", 1): "UINT8",
    ("u", 2): "UINT16",
    ("u", 4): "UINT32",
    ("u", 8): "UINT64",
    ("i", 1): "INT8",
    ("i", 2): "INT16",
    ("i", 4): "INT32",
    ("i", 8): "INT64",
    ("f", 2): "FP16",
    ("f", 4): "FP32",
    ("f", 8): "FP64",
}


# --- requests ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    """One request; ``accept`` lists the statuses that are answers rather than errors."""

    method: Literal["GET", "POST"]
    path: str
    body: bytes | None = None
    accept: frozenset[int] = field(default=_OK)
    # Headers made anew for each try (a request signature: a fresh time and nonce each time).
    signer: Callable[[], dict[str, str]] | None = field(default=None, repr=False)

    @property
    def idempotent(self) -> bool:
        """Whether the call may be repeated after any failure."""
        return self.method == "GET"

    @property
    def headers(self) -> dict[str, str]:
        """Headers particular to this call."""
        return {"Content-Type": "application/json"} if self.body is not None else {}

    def attempt_headers(self) -> dict[str, str]:
        """Headers for one try: ``headers`` and, for a signed call, a new signature."""
        return {**self.headers, **(self.signer() if self.signer is not None else {})}


def model_path(model: str) -> str:
    """The URL path of a model, with its name escaped."""
    if not isinstance(model, str) or not model:
        raise ValueError("model must be a non-empty string")
    return f"/v2/models/{quote(model, safe='')}"


def live_call() -> Call:
    """``GET /v2/health/live``."""
    return Call("GET", "/v2/health/live", accept=_HEALTH)


def ready_call() -> Call:
    """``GET /v2/health/ready``."""
    return Call("GET", "/v2/health/ready", accept=_HEALTH)


def metadata_call(model: str) -> Call:
    """``GET /v2/models/{model}``."""
    return Call("GET", model_path(model))


def model_ready_call(model: str) -> Call:
    """``GET /v2/models/{model}/ready``."""
    return Call("GET", f"{model_path(model)}/ready", accept=_HEALTH)


def terms_call() -> Call:
    """``GET /v1/terms``."""
    return Call("GET", "/v1/terms")


def accept_terms_call(version: str) -> Call:
    """``POST /v1/terms/accept`` for one version of the terms."""
    if not isinstance(version, str) or not version:
        raise ValueError("version must be a non-empty string")
    return Call("POST", "/v1/terms/accept", body=_encode({"version": version}))


def infer_call(
    model: str,
    inputs: Mapping[str, npt.NDArray[Any]],
    *,
    top_k: int | None = None,
    request_id: str | None = None,
) -> Call:
    """``POST /v2/models/{model}/infer`` carrying ``inputs`` as flat row-major JSON tensors."""
    if not isinstance(inputs, Mapping) or not inputs:
        raise TypeError("inputs must be a NumPy array or a non-empty dict of name -> array")
    body: dict[str, Any] = {}
    if request_id is not None:
        body["id"] = request_id
    body["inputs"] = [tensor_json(name, array) for name, array in inputs.items()]
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
        body["parameters"] = {"classification": top_k}
    return Call("POST", f"{model_path(model)}/infer", body=_encode(body))


def tensor_json(name: str, array: npt.NDArray[Any]) -> dict[str, Any]:
    """One v2 input tensor: its name, shape, datatype (from the dtype) and flat data."""
    if not isinstance(name, str) or not name:
        raise ValueError("input names must be non-empty strings")
    if not isinstance(array, np.ndarray):
        raise TypeError(f"input {name!r} must be a NumPy array, got {type(array).__name__}")
    datatype = datatype_of(array.dtype)
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise ValueError(f"input {name!r} holds NaN or infinity, which JSON cannot carry")
    return {
        "name": name,
        "shape": list(array.shape),
        "datatype": datatype,
        "data": array.reshape(-1).tolist(),
    }


def numpy_dtype(datatype: str) -> np.dtype[Any] | None:
    """The NumPy dtype of a v2 datatype (FP32 -> float32), ``None`` for one without (BYTES)."""
    for (kind, size), name in _DATATYPE_BY_KIND_SIZE.items():
        if name == datatype:
            return np.dtype("bool" if kind == "b" else f"{kind}{size}")
    return None


def datatype_of(dtype: np.dtype[Any]) -> str:
    """The v2 datatype name of a NumPy dtype (float32 -> FP32, bool -> BOOL, ...)."""
    try:
        return _DATATYPE_BY_KIND_SIZE[(dtype.kind, dtype.itemsize)]
    except KeyError:
        raise ValueError(f"no v2 datatype for NumPy dtype {dtype}") from None


def single_input_name(metadata: ModelMetadata) -> str:
    """The name of a model's only input, for calls that pass a bare array."""
    if len(metadata.inputs) != 1:
        names = ", ".join(spec.name for spec in metadata.inputs) or "none"
        raise ValueError(
            f"model {metadata.name!r} has inputs {names}; pass a dict of name -> array"
        )
    return metadata.inputs[0].name


def _encode(body: dict[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":"), allow_nan=False).encode()


# --- responses -----------------------------------------------------------------------------


def parse_health(response: httpx.Response) -> bool:
    """True for 200, False for 503 (the only statuses a health call accepts)."""
    return response.status_code == 200


def parse_metadata(response: httpx.Response) -> ModelMetadata:
    """A ``ModelMetadata`` from ``GET /v2/models/{name}``."""
    doc = json_object(response)
    params = _get(doc, "parameters", dict)
    task = _task(_get(params, "task", str))
    labels = params.get("labels")
    policy = params.get("policy") or {}
    if not isinstance(policy, dict):
        raise ProtocolError("field 'policy' is not an object")
    max_batch = params.get("max_batch_size")
    if max_batch is not None and not (_is_int(max_batch) and max_batch >= 1):
        raise ProtocolError(f"max_batch_size must be a positive integer, got {max_batch!r}")
    return ModelMetadata(
        name=_get(doc, "name", str),
        versions=tuple(_str_list(doc.get("versions", []), "versions")),
        platform=str(doc.get("platform", "")),
        inputs=_specs(doc, "inputs"),
        outputs=_specs(doc, "outputs"),
        task=task,
        policy=policy,
        labels=None if labels is None else tuple(_str_list(labels, "labels")),
        raw=doc,
        max_batch_size=max_batch,
    )


def parse_prediction(response: httpx.Response) -> Prediction:
    """A ``Prediction`` from an infer response holding a classification or embedding output."""
    return prediction_from_json(json_object(response))


def prediction_from_json(doc: dict[str, Any]) -> Prediction:
    """A ``Prediction`` from an infer response's JSON object."""
    outputs = {out.get("name"): out for out in _get(doc, "outputs", list) if isinstance(out, dict)}
    model_name = _get(doc, "model_name", str)
    request_id = doc.get("id")
    request_id = None if request_id is None else str(request_id)
    if "classification" in outputs:
        labels, indices, scores = _classification(outputs["classification"])
        return Prediction(model_name, request_id, "classification", doc, labels, indices, scores)
    if "embedding" in outputs:
        embeddings = _embedding(outputs["embedding"])
        return Prediction(model_name, request_id, "embedding", doc, embeddings=embeddings)
    names = ", ".join(repr(name) for name in outputs) or "none"
    raise ProtocolError(f"no 'classification' or 'embedding' output (got {names})")


def parse_terms(response: httpx.Response) -> Terms:
    """``Terms`` from ``GET /v1/terms``."""
    doc = json_object(response)
    return Terms(_get(doc, "version", str), _get(doc, "text", str), _get(doc, "sha256", str))


def parse_acceptance(response: httpx.Response) -> TermsAcceptance:
    """``TermsAcceptance`` from ``POST /v1/terms/accept``."""
    doc = json_object(response)
    return TermsAcceptance(_get(doc, "accepted", bool), _get(doc, "version", str))


def _classification(
    output: dict[str, Any],
) -> tuple[list[list[str | None]], npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    """Split "score:index:label" strings (score may be empty, label absent) into arrays."""
    batch, k = _matrix_shape(output)
    data = _get(output, "data", list)
    if len(data) != batch * k or not all(isinstance(item, str) for item in data):
        raise ProtocolError(f"classification data must be {batch * k} strings")
    scores = np.full(batch * k, np.nan, dtype=np.float32)
    indices = np.zeros(batch * k, dtype=np.int64)
    flat_labels: list[str | None] = []
    for i, item in enumerate(data):
        parts = item.split(":", 2)
        try:
            if parts[0]:
                scores[i] = float(parts[0])
            indices[i] = int(parts[1])
        except (ValueError, IndexError):
            raise ProtocolError(f"bad classification entry {item!r}") from None
        flat_labels.append(parts[2] if len(parts) == 3 else None)
    labels = [flat_labels[row * k : (row + 1) * k] for row in range(batch)]
    return labels, indices.reshape(batch, k), scores.reshape(batch, k)


def _embedding(output: dict[str, Any]) -> npt.NDArray[np.float32]:
    shape = _matrix_shape(output)
    try:
        values = np.asarray(_get(output, "data", list))
    except ValueError:
        raise ProtocolError("embedding data is not a rectangular array") from None
    if values.dtype.kind not in "iuf" or values.size != shape[0] * shape[1]:
        raise ProtocolError(f"embedding data must be {shape[0] * shape[1]} numbers")
    return values.astype(np.float32).reshape(shape)


def _matrix_shape(output: dict[str, Any]) -> tuple[int, int]:
    shape = _get(output, "shape", list)
    if len(shape) != 2 or not all(_is_int(d) and d >= 0 for d in shape):
        raise ProtocolError(f"output shape must be [batch, n], got {shape!r}")
    return int(shape[0]), int(shape[1])


def _specs(doc: dict[str, Any], key: str) -> tuple[TensorSpec, ...]:
    specs = []
    for item in _get(doc, key, list):
        if not isinstance(item, dict):
            raise ProtocolError(f"{key} entries must be objects")
        shape = _get(item, "shape", list)
        if not all(_is_int(d) for d in shape):
            raise ProtocolError(f"{key} shape must be integers, got {shape!r}")
        specs.append(TensorSpec(_get(item, "name", str), _get(item, "datatype", str), tuple(shape)))
    return tuple(specs)


def _task(value: str) -> Task:
    if value == "classification":
        return "classification"
    if value == "embedding":
        return "embedding"
    raise ProtocolError(f"unknown task {value!r}")


def json_object(response: httpx.Response) -> dict[str, Any]:
    try:
        doc = response.json()
    except ValueError:
        raise ProtocolError("response is not JSON") from None
    if not isinstance(doc, dict):
        raise ProtocolError("response is not a JSON object")
    return doc


def _get(doc: Mapping[str, Any], key: str, kind: type[T]) -> T:
    value = doc.get(key)
    if not isinstance(value, kind):
        raise ProtocolError(f"field {key!r} is missing or not a {kind.__name__}")
    return value


def _str_list(value: Any, what: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ProtocolError(f"{what} must be a list of strings")
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
