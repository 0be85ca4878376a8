"""Typed dependencies the routes share: the tier's state and the caller the gate admitted.

A route that declares ``Authenticated`` or ``Admitted`` has its API key checked before its body
is read (``public_api.admission``); these dependencies take that caller from the request's
``RequestContext``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from public_api.context import RequestContext
from public_api.state import PublicState

if TYPE_CHECKING:
    from public_api.protection import Caller


# Declares the API key in the OpenAPI document as a bearer security scheme. The gate reads the
# raw header itself (its 401 messages say what was wrong), so this never refuses on its own.
_bearer = HTTPBearer(
    auto_error=False, scheme_name="ApiKey", description="An API key: `Authorization: Bearer sv_...`"
)
ApiKeyCredentials = Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)]


def tier_state(request: Request) -> PublicState:
    """The tier's state, built by the app's lifespan."""
    state: PublicState = request.app.state.splitvault
    return state


async def get_state(request: Request) -> PublicState:
    """``tier_state`` as a dependency (async: FastAPI runs a plain ``def`` in a worker thread)."""
    return tier_state(request)


def client_address(request: Request) -> str:
    """The peer address; behind a proxy named in ``trusted_proxies``, the address it forwarded."""
    return request.client.host if request.client else "unknown"


async def authenticated_caller(
    request: Request,
    _credentials: ApiKeyCredentials,
) -> Caller:
    """The caller behind the API key (401 when missing or wrong); no other check."""
    context = RequestContext.of(request.scope)
    if context.caller is None:  # not checked before the body (an app without ``Admission``)
        state = tier_state(request)
        authorization = request.headers.get("authorization")
        context.caller = await state.protection.authenticate(authorization, context.client)
    return context.caller


async def admitted_caller(
    request: Request,
    model: str,
    _credentials: ApiKeyCredentials,
) -> Caller:
    """Key, terms and monitor for an inference on ``model`` (limits come once the body says
    how many samples it holds)."""
    caller = await authenticated_caller(request, _credentials)
    await tier_state(request).protection.admit(caller, model)
    return caller


async def body_named_caller(request: Request, _credentials: ApiKeyCredentials) -> Caller:
    """The caller of an inference route whose body names the model (``/v1/embeddings``): its
    key, checked before the body is read; the route admits it once the body is parsed."""
    return await authenticated_caller(request, _credentials)


State = Annotated[PublicState, Depends(get_state)]
Authenticated = Annotated["Caller", Depends(authenticated_caller)]
Admitted = Annotated["Caller", Depends(admitted_caller)]
BodyNamed = Annotated["Caller", Depends(body_named_caller)]
