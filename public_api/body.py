"""Request bodies: large JSON parsed off the loop; binary tensor requests split from their JSON.

JSON request bodies above ``OFFLOAD_BYTES`` are parsed in a worker thread, not on the loop.

FastAPI parses a JSON body with ``json.loads`` on the event loop; a 15 MB body takes a few
hundred milliseconds, during which no other request of the process moves. ``OffLoopJsonRoute``
parses such a body in a thread first and hands FastAPI the result, which it then reuses.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from public_api.binary import HEADER_LENGTH, MEDIA_TYPE, split_body
from public_api.context import RequestContext

OFFLOAD_BYTES = 1024 * 1024


class OffLoopJsonRoute(APIRoute):
    """An ``APIRoute`` whose large JSON bodies are parsed off the event loop, and whose binary
    tensor requests (``Inference-Header-Content-Length``) are split: FastAPI sees the JSON
    header as the body, the tensor bytes go to the request's ``RequestContext.binary``."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def parse_large_bodies_in_a_thread(request: Request) -> Response:
            declared = request.headers.get(HEADER_LENGTH)
            if declared is not None:
                head, tail = split_body(await _body(request), declared)
                request._json = await _parse(head)  # what ``Request.json()`` returns from now on
                _read_as_json(request)
                RequestContext.of(request.scope).binary = tail
            elif _is_json(request) and _declared_length(request) > OFFLOAD_BYTES:
                body = await _body(request)
                if len(body) > OFFLOAD_BYTES:
                    request._json = await _parse(body)
            return await handler(request)

        return parse_large_bodies_in_a_thread


async def _body(request: Request) -> bytes:
    try:
        return await request.body()
    except HTTPException:  # the body limit's 413
        raise
    except Exception as error:  # the client went away: as FastAPI answers it
        raise HTTPException(400, "There was an error parsing the body") from error


async def _parse(body: bytes) -> Any:
    """``json.loads``, in a worker thread when the body is large; errors as FastAPI's."""
    try:
        if len(body) > OFFLOAD_BYTES:
            return await asyncio.to_thread(json.loads, body)
        return json.loads(body)
    except json.JSONDecodeError as error:
        raise _invalid(error) from error
    except Exception as error:  # not UTF-8, too deep: as FastAPI answers them
        raise HTTPException(400, "There was an error parsing the body") from error


def _is_json(request: Request) -> bool:
    """JSON, or no content type at all (read as JSON, as stock v2 clients send it)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    return content_type in ("", "application/json") or content_type.endswith("+json")


def _read_as_json(request: Request) -> None:
    """Let FastAPI read a binary request sent as ``application/octet-stream`` as the JSON
    header it holds (it reads JSON only from a JSON content type, or none)."""
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != MEDIA_TYPE:
        return
    request.scope["headers"] = [
        (name, b"application/json" if name == b"content-type" else value)
        for name, value in request.scope["headers"]
    ]
    request.__dict__.pop("_headers", None)  # ``Request.headers`` is cached from the scope


def _declared_length(request: Request) -> int:
    declared = request.headers.get("content-length", "")
    return int(declared) if declared.isdigit() else 0


def _invalid(error: json.JSONDecodeError) -> RequestValidationError:
    """The error FastAPI raises for malformed JSON (answered by the same handler)."""
    return RequestValidationError(
        [{"type": "json_invalid", "loc": ("body", error.pos), "msg": "JSON decode error"}]
    )
