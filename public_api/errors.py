"""HTTP side of the one error table: every error is ``{"error": "..."}`` with its status."""

from __future__ import annotations

import json
import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from public_api.context import RequestContext
from shared.errors import InvalidInput, SplitVaultError, mapping_for
from shared.logs import get_logger

log = get_logger(__name__)


def error_response(
    status: int,
    message: str,
    retry_after_s: float | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """A JSON error body, with ``Retry-After`` (whole seconds) when a retry makes sense."""
    all_headers = dict(headers or {})
    if retry_after_s:
        all_headers.setdefault("Retry-After", str(max(1, math.ceil(retry_after_s))))
    return JSONResponse({"error": message}, status_code=status, headers=all_headers or None)


def _note(request: Request, error: SplitVaultError) -> None:
    """Keep why the request was refused, for its audit record (``public_api.outcomes``)."""
    RequestContext.of(request.scope).refused(error)


async def _splitvault_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, SplitVaultError)
    _note(request, error)
    status = mapping_for(error).http_status
    if status >= 500:
        log.warning("request_unavailable", error=type(error).__name__, detail=error.message)
    return error_response(status, error.message, error.retry_after_s, error.headers)


async def _validation_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, RequestValidationError)
    first = error.errors()[0] if error.errors() else {}
    if first.get("type") == "json_invalid":
        message = "malformed JSON body"
    else:
        where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
        message = f"invalid request: {where or 'body'}: {first.get('msg', 'invalid')}"
    _note(request, InvalidInput(message))
    return error_response(400, message)


async def _http_error(_request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, HTTPException)
    return JSONResponse(
        {"error": str(error.detail)},
        status_code=error.status_code,
        headers=getattr(error, "headers", None),
    )


async def _unexpected(_request: Request, error: Exception) -> JSONResponse:
    log.error("unhandled_error", error=type(error).__name__, detail=str(error)[:300])
    return error_response(500, "internal error")


async def _bad_json(request: Request, error: Exception) -> JSONResponse:
    message = f"malformed JSON body: {error}"
    _note(request, InvalidInput(message))
    return error_response(400, message)


def install_error_handlers(app: FastAPI) -> None:
    """Route every error through the table above."""
    app.add_exception_handler(SplitVaultError, _splitvault_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(json.JSONDecodeError, _bad_json)
    app.add_exception_handler(Exception, _unexpected)
