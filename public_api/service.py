"""The public tier's protocol-neutral core: check, run the front, call the private tier, format.

It knows nothing of HTTP: routes parse a v2 request, ``decode`` it (which says how many
samples it asks for, the unit of the limits), then ``infer`` and return what it returns; errors
are ``SplitVaultError`` subclasses mapped by the one table.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from protos import inference_pb2
from public_api.front import FrontRunner, FrontStage
from public_api.private_client import PrivateTierClient
from public_api.text import TEXT_INPUT, EncodedText, TextEncoder, TextUsage, sentences_of
from public_api.v2 import (
    InferenceRequest,
    InferenceResponse,
    MetadataTensor,
    ModelMetadata,
    ResponseOutput,
)
from shared import phases
from shared.errors import InvalidInput, ModelNotFound, ModelNotReady
from shared.logs import get_logger
from shared.manifest import BATCH_DIM, MAX_TOP_K, DimSpec, ModelConfig, TensorSpec, TopKPolicy
from shared.tensor_codec import array_from_bytes, array_from_json, from_proto, to_proto
from shared.validation import check_tensors

log = get_logger(__name__)
CLASSIFICATION, EMBEDDING = "classification", "embedding"
# A request declaring more elements than this is decoded in a worker thread, not on the loop.
OFFLOAD_ELEMENTS = 64 * 1024
# Text requests of more characters than this are tokenized in a worker thread.
OFFLOAD_CHARS = 4 * 1024  # about a millisecond of tokenizing
Buffer = bytes | memoryview  # a raw tensor's bytes


@dataclass(frozen=True)
class Decoded:
    """A request checked against its model: its arrays, its samples (rows of the batch
    dimension, at least 1) and the top-k it asks for (0: the policy's)."""

    model: str
    request: InferenceRequest
    arrays: dict[str, Any]
    samples: int
    top_k: int
    text: TextUsage | None = None  # the request came as text: what the tokenizer made of it


@dataclass(frozen=True)
class InferenceOutcome:
    """An answer and what the protections need to know about how it was made."""

    response: InferenceResponse
    inputs: dict[str, Any]
    activations: dict[str, Any]
    predicted: Any  # top-1 class per sample (classifiers), else None
    front_seconds: float
    private_seconds: float


class InferenceService:
    """Serves the front stages it holds, with the private tier answering the rest."""

    def __init__(
        self,
        stages: dict[str, FrontStage],
        front: FrontRunner,
        private: PrivateTierClient,
        *,
        max_elements: int,
        on_not_ready: Callable[[], None] | None = None,
        texts: Mapping[str, TextEncoder] | None = None,
    ) -> None:
        """``on_not_ready``: called when the private tier answers that a model is not ready;
        ``texts``: the tokenizers of the models that take text."""
        self.stages = stages
        self.texts = dict(texts or {})
        self._front = front
        self._private = private
        self._max_elements = max_elements
        self._on_not_ready = on_not_ready
        self._in_flight = 0  # requests between their front stage and the private reply

    def stage(self, model: str) -> FrontStage:
        """The front stage of ``model`` or ``ModelNotFound``."""
        try:
            return self.stages[model]
        except KeyError:
            raise ModelNotFound(f"model {model!r} is not deployed") from None

    async def decode(
        self, model: str, request: InferenceRequest, raw: Mapping[str, Buffer] | None = None
    ) -> Decoded:
        """Check ``request`` against ``model`` and decode its tensors (400, 404, 413);
        ``raw``: the bytes of the inputs sent as raw tensors, by input name.

        Large requests are decoded in a worker thread, so that they do not stall the loop.
        """
        stage = self.stage(model)
        top_k = _requested_k(request)
        declared = sum(math.prod(item.shape) for item in request.inputs if item.shape)
        usage = None
        if any(item.datatype == "BYTES" for item in request.inputs):
            encoded = await self._encode_text(model, request, raw or {})
            arrays, usage = encoded.arrays, encoded.usage
        elif declared > OFFLOAD_ELEMENTS:
            arrays = await asyncio.to_thread(self._decode, request, raw or {})
        else:
            arrays = self._decode(request, raw or {})
        sizes = check_tensors(stage.manifest.inputs, arrays)
        batch = sizes.get(BATCH_DIM, 0)
        if batch > stage.config.max_batch_size:
            raise InvalidInput(
                f"batch {batch} exceeds this model's limit {stage.config.max_batch_size}"
            )
        return Decoded(model, request, arrays, max(batch, 1), top_k, usage)

    async def _encode_text(
        self, model: str, request: InferenceRequest, raw: Mapping[str, Buffer]
    ) -> EncodedText:
        """Token arrays for a request whose one input is ``text`` (400 otherwise)."""
        encoder = self.texts.get(model)
        if encoder is None:
            raise InvalidInput(
                f"model {model!r} takes no text (it was packed without a tokenizer); "
                "send its token ids"
            )
        if [item.name for item in request.inputs] != [TEXT_INPUT]:
            raise InvalidInput(f"a text request has one input, {TEXT_INPUT!r} (BYTES)")
        item = request.inputs[0]
        sentences = sentences_of(item, raw.get(item.name), self.stage(model).config.max_batch_size)
        if sum(len(sentence) for sentence in sentences) > OFFLOAD_CHARS:
            return await asyncio.to_thread(encoder.encode, sentences)
        return encoder.encode(sentences)

    async def infer(
        self,
        decoded: Decoded,
        *,
        key_id: str | None = None,
        signature: inference_pb2.RequestSignature | None = None,
    ) -> InferenceOutcome:
        """Answer a decoded request with the model's restricted output (``key_id``: who asked;
        ``signature``: the customer's, forwarded to the private tier that verifies it)."""
        started = time.perf_counter()
        model, request, arrays = decoded.model, decoded.request, decoded.arrays
        stage = self.stage(model)
        self._in_flight += 1
        try:
            lone = self._in_flight == 1
            activations = await self._front.run(stage, arrays, decoded.samples, lone=lone)
            front_done = time.perf_counter()
            phases.mark("front_returned")
            tensors = [to_proto(name, value) for name, value in activations.items()]
            tensors += [to_proto(name, arrays[name]) for name in stage.manifest.forward_inputs]
            phases.mark("activations_encoded")
            reply = await self._call_private(
                inference_pb2.InferRequest(
                    model=model,
                    inputs=tensors,
                    top_k=decoded.top_k,
                    request_id=request.id or uuid.uuid4().hex,
                    key_id=key_id or "",
                    signature=signature,
                    pairing_id=stage.manifest.pairing_id or "",
                )
            )
        finally:
            self._in_flight -= 1
        phases.mark("private_replied")
        outputs = {tensor.name: from_proto(tensor) for tensor in reply.outputs}
        response = InferenceResponse(
            model_name=model,
            id=request.id,
            parameters=None if decoded.text is None else usage_parameters(decoded.text),
            outputs=[format_output(stage.config, outputs)],
        )
        phases.mark("response_built")
        indices = outputs.get("indices")
        return InferenceOutcome(
            response=response,
            inputs=arrays,
            activations=activations,
            predicted=None if indices is None else indices[:, 0],
            front_seconds=front_done - started,
            private_seconds=time.perf_counter() - front_done,
        )

    def metadata(self, model: str) -> ModelMetadata:
        """v2 model metadata, from the public manifest (never the private one)."""
        stage = self.stage(model)
        config = stage.config
        text = [MetadataTensor(name=TEXT_INPUT, datatype="BYTES", shape=[-1])]
        return ModelMetadata(
            name=config.name,
            versions=["1"],
            platform="splitvault",
            inputs=[_metadata_tensor(spec) for spec in stage.manifest.inputs]
            + (text if model in self.texts else []),
            outputs=[_output_metadata(config)],
            parameters={
                "task": config.task,
                "policy": config.policy.model_dump(),
                "labels": config.labels,
                # The most rows one request may carry; the SDK's predict(chunk=True) reads it.
                "max_batch_size": config.max_batch_size,
            },
        )

    def _not_ready(self) -> None:
        if self._on_not_ready is not None:
            self._on_not_ready()

    async def _call_private(
        self, request: inference_pb2.InferRequest
    ) -> inference_pb2.InferResponse:
        """The private tier's answer; its refusals told in the client's terms.

        This tier holds the front stage, so a back stage the private tier lacks or refuses is
        the deployment's fault: 503, never 404. Activations it refuses are described without
        the stages' internal tensor names (logged for the operator).
        """
        model = request.model
        try:
            return await self._private.infer(request)
        except ModelNotReady:
            self._not_ready()
            raise
        except ModelNotFound:
            self._not_ready()
            raise ModelNotReady(
                f"model {model!r} is not ready (the private tier does not hold it)",
                retry_after_s=1.0,
            ) from None
        except InvalidInput as error:
            log.warning("private_refused_activations", model=model, detail=error.message)
            raise InvalidInput(
                f"model {model!r} cannot process this input (its front-stage output was refused)"
            ) from None

    def _decode(self, request: InferenceRequest, raw: Mapping[str, Buffer]) -> dict[str, Any]:
        arrays: dict[str, Any] = {}
        limit = self._max_elements
        for item in request.inputs:
            if item.name in arrays:
                raise InvalidInput(f"input {item.name!r} appears twice")
            try:
                if item.name in raw:
                    arrays[item.name] = array_from_bytes(
                        raw[item.name], item.datatype, item.shape, max_elements=limit
                    )
                elif item.data is not None:
                    arrays[item.name] = array_from_json(
                        item.data, item.datatype, item.shape, max_elements=limit
                    )
                else:
                    raise InvalidInput("no data (and no binary_data_size)")
            except InvalidInput as error:
                raise type(error)(f"input {item.name!r}: {error.message}") from None
        return arrays


def usage_parameters(usage: TextUsage) -> dict[str, Any]:
    """What a text request's answer says of its tokens (v2 response ``parameters``)."""
    return {
        "prompt_tokens": usage.total,
        "truncated": usage.truncated,
        "max_tokens_per_input": usage.max_length,
    }


def _requested_k(request: InferenceRequest) -> int:
    """The top-k asked for (0: none); the policy's own k still caps what is answered."""
    values: list[Any] = [(request.parameters or {}).get(CLASSIFICATION)]
    values += [(out.parameters or {}).get(CLASSIFICATION) for out in request.outputs or []]
    for value in values:
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_TOP_K:
            raise InvalidInput(
                f"parameter 'classification' must be an integer from 1 to {MAX_TOP_K}"
            )
        return value
    return 0


def format_output(config: ModelConfig, outputs: dict[str, Any]) -> ResponseOutput:
    """The v2 output for a restricted answer: classification strings or an embedding."""
    if config.task == "embedding":
        values = outputs[EMBEDDING]
        return ResponseOutput(
            name=EMBEDDING, shape=list(values.shape), datatype="FP32", data=values.ravel().tolist()
        )
    indices = outputs["indices"]
    scores = outputs.get("scores")
    labels = config.labels or []
    strings = [
        _classification_string(
            int(index), None if scores is None else float(scores.flat[i]), labels
        )
        for i, index in enumerate(indices.ravel())
    ]
    return ResponseOutput(
        name=CLASSIFICATION, shape=list(indices.shape), datatype="BYTES", data=strings
    )


def _classification_string(index: int, score: float | None, labels: list[str]) -> str:
    """v2 classification extension: ``score:index:label`` (score empty for label-only)."""
    text = "" if score is None else repr(score)
    label = labels[index] if 0 <= index < len(labels) else None
    return f"{text}:{index}" if label is None else f"{text}:{index}:{label}"


def _metadata_tensor(spec: TensorSpec) -> MetadataTensor:
    shape = [-1 if isinstance(dim, DimSpec) else dim for dim in spec.shape]
    return MetadataTensor(name=spec.name, datatype=spec.datatype, shape=shape)


def _output_metadata(config: ModelConfig) -> MetadataTensor:
    if config.task == "embedding":
        return MetadataTensor(name=EMBEDDING, datatype="FP32", shape=[-1, -1])
    k = config.policy.k if isinstance(config.policy, TopKPolicy) else 1
    return MetadataTensor(name=CLASSIFICATION, datatype="BYTES", shape=[-1, k])
