"""Typed dependencies the routes share: the tier's state and the caller the gate admitted."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Header, Request

from shared.errors import SplitVaultError

if TYPE_CHECKING:
    from public_api.app import PublicState
    from public_api.protection import Caller


def get_state(request: Request) -> PublicState:
    """The tier's state, built by the app's lifespan."""
    state: PublicState = request.app.state.splitvault
    return state


def client_address(request: Request) -> str:
    """The peer address (deployments behind a proxy should set uvicorn's forwarded-allow-ips)."""
    return request.client.host if request.client else "unknown"


async def authenticated_caller(
    request: Request,
    authorization: Annotated[str | None, Header()] = None,
) -> Caller:
    """The caller behind the API key (401 when missing or wrong); no other check."""
    state = get_state(request)
    return await state.protection.authenticate(authorization, client_address(request))


async def admitted_caller(
    request: Request,
    model: str,
    authorization: Annotated[str | None, Header()] = None,
) -> Caller:
    """Key, terms, monitor and limits for an inference on ``model``; audited when refused."""
    state = get_state(request)
    client = client_address(request)
    request.state.audit_model = model
    try:
        caller = await state.protection.admit(authorization, client, model)
    except SplitVaultError:
        request.state.audited = True  # ``admit`` audited the refusal, under the key if known
        raise
    request.state.caller = caller
    return caller


State = Annotated["PublicState", Depends(get_state)]
Authenticated = Annotated["Caller", Depends(authenticated_caller)]
Admitted = Annotated["Caller", Depends(admitted_caller)]
