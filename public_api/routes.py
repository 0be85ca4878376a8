"""v2 REST routes: decode, call the service, encode. No logic lives here."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Path, Request, Response
from fastapi.responses import JSONResponse

from public_api.binary import (
    EXTENSION,
    HEADER_LENGTH,
    MEDIA_TYPE,
    binary_answer,
    input_buffers,
    wants_binary,
)
from public_api.body import OffLoopJsonRoute
from public_api.context import RequestContext
from public_api.deps import Admitted, Authenticated, State
from public_api.pipeline import serve_inference
from public_api.sealing import rest_content_type
from public_api.signing import forwarded_signature
from public_api.state import VERSION, PublicState
from public_api.v2 import (
    AcceptTerms,
    AcceptTermsResponse,
    ErrorBody,
    InferenceRequest,
    InferenceResponse,
    ModelEntry,
    ModelList,
    ModelMetadata,
    RepositoryIndexEntry,
    RepositoryIndexRequest,
    ServerMetadata,
    TermsBody,
)
from shared import phases

# A body without a Content-Type is read as JSON, as stock v2 clients (tritonclient) send it.
# Every route with a body needs an API key in a header, which no browser sends cross-origin
# without a preflight, so this opens no form-post path.
router = APIRouter(route_class=OffLoopJsonRoute, strict_content_type=False)
ModelName = Path(min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9_.-]*$")
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 401, 403, 404, 413, 429, 500, 503)
}


@router.get("/v2/health/live", tags=["health"])
async def live() -> dict[str, bool]:
    """The process is up."""
    return {"live": True}


@router.get("/v2/health/ready", tags=["health"], responses={503: {"model": ErrorBody}})
async def ready(state: State) -> JSONResponse:
    """Ready when the private tier reports SERVING and every model is ready in both tiers."""
    serving = bool(state.service.stages) and await state.private.serving()
    state.metrics.set_private_ready(serving)
    if not serving:
        return _not_ready({"ready": False, "error": "private tier not serving"}, state)
    models = await state.models.states()
    waiting = [model for model in models if not model.ready]
    if not waiting:
        return JSONResponse({"ready": True})
    # No model names: this route answers without an API key (the log names them).
    error = f"{len(waiting)} of {len(models)} models not ready (see the log: model_sets_differ)"
    return _not_ready({"ready": False, "error": error}, state)


def _not_ready(body: dict[str, Any], state: PublicState) -> JSONResponse:
    return JSONResponse(
        body, status_code=503, headers={"Retry-After": str(state.settings.retry_after_s)}
    )


@router.get("/v2", tags=["metadata"])
async def server_metadata() -> ServerMetadata:
    """Server name, version and protocol extensions."""
    return ServerMetadata(
        name="splitvault", version=VERSION, extensions=["classification", EXTENSION]
    )


@router.get("/v2/models/{model}", tags=["metadata"], responses=_ERRORS)
async def model_metadata(
    state: State, _caller: Authenticated, model: str = ModelName
) -> ModelMetadata:
    """Inputs, outputs and output policy of a model."""
    return state.service.metadata(model)


@router.get("/v2/models/{model}/ready", tags=["health"], responses=_ERRORS)
async def model_ready(state: State, _caller: Authenticated, model: str = ModelName) -> JSONResponse:
    """Ready when both stages of the model are loaded and come from one pack."""
    state.service.stage(model)  # 404 for a model this tier does not hold
    found = await state.models.state(model)
    if found.ready:
        return JSONResponse({"name": model, "ready": True})
    error = f"model {model!r} is not ready: {found.reason}"
    return _not_ready({"name": model, "ready": False, "error": error}, state)


@router.get("/v2/models", tags=["metadata"], responses=_ERRORS)
async def model_list(state: State, _caller: Authenticated) -> ModelList:
    """Every model this endpoint serves, ready in both tiers or not (with the reason)."""
    return ModelList(
        models=[
            ModelEntry(
                name=model.name,
                versions=["1"],
                platform="splitvault",
                ready=model.ready,
                reason=model.reason or None,
            )
            for model in await state.models.states()
        ]
    )


@router.post("/v2/repository/index", tags=["metadata"], responses=_ERRORS)
async def repository_index(
    state: State, _caller: Authenticated, body: RepositoryIndexRequest | None = None
) -> list[RepositoryIndexEntry]:
    """Triton's model repository index: every model with its state (``ready``: ready only)."""
    only_ready = body is not None and body.ready
    return [
        RepositoryIndexEntry(
            name=model.name,
            version="1",
            state="READY" if model.ready else "UNAVAILABLE",
            reason=model.reason,
        )
        for model in await state.models.states()
        if model.ready or not only_ready
    ]


@router.post(
    "/v2/models/{model}/infer",
    tags=["inference"],
    responses=_ERRORS,
    response_model=InferenceResponse,  # or raw bytes after JSON, when the request asks so
    response_model_exclude_none=True,
)
async def infer(
    body: InferenceRequest,
    state: State,
    caller: Admitted,
    request: Request,
    response: Response,
    model: str = ModelName,
) -> InferenceResponse | Response:
    """Run the model; the answer is restricted by the model's output policy. Tensors may come
    and go as raw bytes after the JSON (the binary tensor data extension)."""
    phases.mark("route_entered")
    context = RequestContext.of(request.scope)
    context.request_id = body.id  # audited with the answer, or with a refusal
    if state.sealer is not None:  # refuse before any work when the body could not be kept
        state.sealer.check_accepting()
    raw = None if context.binary is None else input_buffers(body, context.binary)
    decoded = await state.service.decode(model, body, raw)
    phases.mark("decoded")
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
    encoding = rest_content_type(request.headers.get(HEADER_LENGTH))
    outcome = await serve_inference(
        state, caller, decoded, signature, sealed, body.id or "", encoding, context=context
    )
    context.audited = True
    if wants_binary(body):
        answer = binary_answer(outcome.response)
        headers = {**caller.headers, HEADER_LENGTH: str(answer.header_length)}
        return Response(answer.body, media_type=MEDIA_TYPE, headers=headers)
    response.headers.update(caller.headers)
    return outcome.response


@router.get("/v1/terms", tags=["terms"])
async def terms(state: State) -> TermsBody:
    """The current terms of service; inference needs a key that accepted this version."""
    current = state.protection.terms
    return TermsBody(version=current.version, text=current.text, sha256=current.sha256)


@router.post("/v1/terms/accept", tags=["terms"], responses=_ERRORS)
async def accept_terms(
    body: AcceptTerms, state: State, caller: Authenticated
) -> AcceptTermsResponse:
    """Accept the current terms with this API key (recorded with time and client address)."""
    await state.protection.accept_terms(caller, body.version)
    return AcceptTermsResponse(accepted=True, version=body.version)
