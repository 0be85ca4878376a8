"""HTTP side of the one error table: every error is ``{"error": "..."}`` with its status.

Under OpenAI-compatible routes (``OPENAI_PATHS``) the same error takes OpenAI's shape,
``{"error": {"message", "type", "param", "code"}}``, with the same status (which is what the
``openai`` client picks its exception class by): ``type`` from the status, ``code`` the error
class's name in snake case (``quota_exceeded``, ``terms_not_accepted``).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import Scope

from public_api.context import RequestContext
from shared.errors import InvalidInput, SplitVaultError, mapping_for
from shared.logs import get_logger

log = get_logger(__name__)
OPENAI_PATHS = ("/v1/embeddings",)
# OpenAI's error ``type`` for each status; other statuses: invalid_request_error below 500,
# server_error from 500.
_OPENAI_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    429: "rate_limit_error",
}


def error_response(
    status: int,
    message: str,
    retry_after_s: float | None = None,
    headers: dict[str, str] | None = None,
    *,
    scope: Scope | None = None,
    code: str | None = None,
    param: str | None = None,
) -> JSONResponse:
    """A JSON error body (shaped for the route of ``scope``), with ``Retry-After`` (whole
    seconds) when a retry makes sense."""
    all_headers = dict(headers or {})
    if retry_after_s:
        all_headers.setdefault("Retry-After", str(max(1, math.ceil(retry_after_s))))
    body = error_body(scope, status, message, code, param)
    return JSONResponse(body, status_code=status, headers=all_headers or None)


def error_body(
    scope: Scope | None,
    status: int,
    message: str,
    code: str | None = None,
    param: str | None = None,
) -> dict[str, Any]:
    """``{"error": message}``, or OpenAI's error object under ``OPENAI_PATHS``."""
    if scope is None or not str(scope.get("path", "")).startswith(OPENAI_PATHS):
        return {"error": message}
    kind = _OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_code(error: SplitVaultError | type[SplitVaultError]) -> str:
    """The class name of ``error`` in snake case: OpenAI-shaped errors' ``code``."""
    name = (error if isinstance(error, type) else type(error)).__name__
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _note(request: Request, error: SplitVaultError) -> None:
    """Keep why the request was refused, for its audit record (``public_api.outcomes``)."""
    RequestContext.of(request.scope).refused(error)


async def _splitvault_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, SplitVaultError)
    _note(request, error)
    status = mapping_for(error).http_status
    if status >= 500:
        log.warning("request_unavailable", error=type(error).__name__, detail=error.message)
    return error_response(
        status,
        error.message,
        error.retry_after_s,
        error.headers,
        scope=request.scope,
        code=error_code(error),
    )


async def _validation_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, RequestValidationError)
    first = error.errors()[0] if error.errors() else {}
    param = None
    if first.get("type") == "json_invalid":
        message = "malformed JSON body"
    else:
        where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
        message = f"invalid request: {where or 'body'}: {first.get('msg', 'invalid')}"
        param = where or None
    code = error_code(InvalidInput)
    _note(request, InvalidInput(message))
    return error_response(400, message, scope=request.scope, code=code, param=param)


async def _http_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, HTTPException)
    return JSONResponse(
        error_body(request.scope, error.status_code, str(error.detail)),
        status_code=error.status_code,
        headers=getattr(error, "headers", None),
    )


async def _unexpected(request: Request, error: Exception) -> JSONResponse:
    log.error("unhandled_error", error=type(error).__name__, detail=str(error)[:300])
    return error_response(500, "internal error", scope=request.scope)


async def _bad_json(request: Request, error: Exception) -> JSONResponse:
    message = f"malformed JSON body: {error}"
    _note(request, InvalidInput(message))
    return error_response(400, message, scope=request.scope, code=error_code(InvalidInput))


def install_error_handlers(app: FastAPI) -> None:
    """Route every error through the table above."""
    app.add_exception_handler(SplitVaultError, _splitvault_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(json.JSONDecodeError, _bad_json)
    app.add_exception_handler(Exception, _unexpected)
