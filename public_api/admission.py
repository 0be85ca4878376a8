"""Refuse from the request head, before any of the body is read (pure ASGI).

For every route that needs an API key (its dependencies include ``Authenticated``,
``Admitted`` or ``BodyNamed``; inference routes are those with ``Admitted`` or, when the body
names the model, ``BodyNamed``), the key is checked here, from the
``Authorization`` header alone: a missing, malformed, unknown or revoked key gets its 401, or
its 429 once the address's bucket of failed authentications is empty, without a byte of the
body being read, and ``Connection: close`` so that the unread body is never taken for a next
request. A request past the connection limit gets the 503 here, on any route. A request that
passes carries its ``Caller`` in its ``RequestContext``. New routes are covered by declaring
the same dependencies.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Receive, Scope, Send

from public_api.context import RequestContext
from public_api.deps import admitted_caller, authenticated_caller, body_named_caller
from public_api.errors import error_code, error_response
from shared.errors import Overloaded, SplitVaultError, mapping_for

_MODEL_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
UNNAMED_MODEL = "(invalid name)"  # the audited model of a path whose model name is invalid
UNREAD_MODEL = "(in body)"  # the audited model of a request refused before its body named one
_INFERENCE = (admitted_caller, body_named_caller)  # dependencies of the inference routes


@dataclass(frozen=True)
class Guarded:
    """A route that needs an API key; ``inference``: every outcome of it is audited."""

    route: APIRoute
    inference: bool


def guarded_routes(routes: Sequence[BaseRoute]) -> list[Guarded]:
    """The routes among ``routes`` whose dependencies check an API key."""
    guarded = []
    for route in routes:
        if not isinstance(route, APIRoute):
            continue
        calls = _calls(route.dependant)
        inference = any(call in calls for call in _INFERENCE)
        if inference or authenticated_caller in calls:
            guarded.append(Guarded(route, inference=inference))
    return guarded


def _calls(dependant: Dependant) -> set[object]:
    found: set[object] = {dependant.call}
    for sub in dependant.dependencies:
        found |= _calls(sub)
    return found


class Admission:
    """Check the API key (and the connection limit) before the body is read."""

    def __init__(self, app: ASGIApp, routes: Sequence[BaseRoute]) -> None:
        """``routes``: the routes as the app serves them (an ``APIRouter``'s, included without
        a prefix)."""
        self.app = app
        self._guarded = guarded_routes(routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        context = RequestContext.of(scope)
        guarded = self._match(scope, context)
        state = scope["app"].state.splitvault
        if context.overloaded:
            busy = Overloaded(
                "too many open connections", retry_after_s=state.settings.retry_after_s
            )
            await _refuse(scope, receive, send, context, busy)
            return
        if guarded is None:
            await self.app(scope, receive, send)
            return
        authorization = _header(scope, b"authorization")
        try:
            context.caller = await state.protection.check_key(
                authorization, context.client, context.model
            )
        except SplitVaultError as error:
            await _refuse(scope, receive, send, context, error)
            return
        await self.app(scope, receive, send)

    def _match(self, scope: Scope, context: RequestContext) -> Guarded | None:
        """The guarded route of this request, if any; an inference route names the model."""
        for guarded in self._guarded:
            match, child = guarded.route.matches(scope)
            if match is Match.FULL:
                if guarded.inference:
                    context.model = _audited_model(child.get("path_params", {}).get("model"))
                return guarded
        return None


def _audited_model(model: object) -> str:
    """The model an inference request is audited under until its body is read: the path's,
    ``UNNAMED_MODEL`` if invalid, ``UNREAD_MODEL`` for a route whose body names it."""
    if model is None:
        return UNREAD_MODEL
    return str(model) if _MODEL_NAME.match(str(model)) else UNNAMED_MODEL


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value).decode("latin-1")
    return None


async def _refuse(
    scope: Scope, receive: Receive, send: Send, context: RequestContext, error: SplitVaultError
) -> None:
    """Answer ``error`` without reading the body; the connection closes after the answer."""
    context.refused(error)
    headers = {**error.headers, "Connection": "close"}
    response = error_response(
        mapping_for(error).http_status,
        error.message,
        error.retry_after_s,
        headers,
        scope=scope,
        code=error_code(error),
    )
    await response(scope, receive, send)
