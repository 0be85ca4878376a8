"""``POST /v1/embeddings`` (OpenAI-compatible): decode, call the shared pipeline, encode.

The model is named in the body, so the key is checked before the body is read (as on every
inference route) and the terms and monitor once it is parsed; then the request goes the way
of every inference (``pipeline.serve_inference``): limits in samples (one input is one
sample), the monitor, the audit and sealing. Stock clients do not sign their requests. Errors
take OpenAI's shape (``public_api.errors``), as the ``openai`` client reads them.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from public_api.body import OffLoopJsonRoute
from public_api.context import RequestContext
from public_api.deps import BodyNamed, State
from public_api.embeddings import (
    EmbeddingsRequest,
    EmbeddingsResponse,
    OpenAIErrorBody,
    embeddings_response,
    v2_request,
)
from public_api.pipeline import serve_inference
from public_api.sealing import EMBEDDINGS_JSON
from public_api.signing import forwarded_signature
from shared.errors import InvalidInput

router = APIRouter(route_class=OffLoopJsonRoute, strict_content_type=False)
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": OpenAIErrorBody} for code in (400, 401, 403, 404, 413, 429, 500, 503)
}


@router.post("/v1/embeddings", tags=["inference"], responses=_ERRORS)
async def embeddings(
    body: EmbeddingsRequest, state: State, caller: BodyNamed, request: Request, response: Response
) -> EmbeddingsResponse:
    """Embed a sentence or a list of sentences; sentences longer than the model's maximum
    length are truncated (``usage.truncated`` lists them)."""
    context = RequestContext.of(request.scope)
    context.model = body.model
    await state.protection.admit(caller, body.model)
    if state.service.stage(body.model).config.task != "embedding":
        raise InvalidInput(f"model {body.model!r} is not an embedding model")
    if body.dimensions is not None:
        raise InvalidInput("'dimensions' is not supported: this model has one embedding size")
    decoded = await state.service.decode(body.model, v2_request(body))
    if decoded.text is None:  # cannot happen: its one input is text
        raise InvalidInput(f"model {body.model!r} takes no text")
    protection = state.settings.protection
    signature = forwarded_signature(
        request.headers,
        await request.body(),
        caller.key_id,
        decoded,
        required=caller.key_id in protection.require_signature_keys,
        window_s=protection.signature_window_s,
    )
    sealed = await request.body() if state.sealer is not None else None
    outcome = await serve_inference(
        state, caller, decoded, signature, sealed, content_type=EMBEDDINGS_JSON, context=context
    )
    context.audited = True
    response.headers.update(caller.headers)
    return embeddings_response(body, outcome, decoded.text)
