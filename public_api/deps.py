"""Typed dependencies the routes share."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request

if TYPE_CHECKING:
    from public_api.app import PublicState


def get_state(request: Request) -> PublicState:
    """The tier's state, built by the app's lifespan."""
    state: PublicState = request.app.state.splitvault
    return state


State = Annotated["PublicState", Depends(get_state)]
