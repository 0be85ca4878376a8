"""JSON request bodies above ``OFFLOAD_BYTES`` are parsed in a worker thread, not on the loop.

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

OFFLOAD_BYTES = 1024 * 1024


class OffLoopJsonRoute(APIRoute):
    """An ``APIRoute`` whose large JSON bodies are parsed off the event loop."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def parse_large_bodies_in_a_thread(request: Request) -> Response:
            if _is_json(request) and _declared_length(request) > OFFLOAD_BYTES:
                try:
                    body = await request.body()
                except HTTPException:  # the body limit's 413
                    raise
                except Exception as error:  # the client went away: as FastAPI answers it
                    raise HTTPException(400, "There was an error parsing the body") from error
                if len(body) > OFFLOAD_BYTES:
                    try:
                        parsed = await asyncio.to_thread(json.loads, body)
                    except json.JSONDecodeError as error:
                        raise _invalid(error) from error
                    except Exception as error:  # not UTF-8, too deep: as FastAPI answers them
                        raise HTTPException(400, "There was an error parsing the body") from error
                    request._json = parsed  # what ``Request.json()`` returns from now on
            return await handler(request)

        return parse_large_bodies_in_a_thread


def _is_json(request: Request) -> bool:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    return content_type == "application/json" or content_type.endswith("+json")


def _declared_length(request: Request) -> int:
    declared = request.headers.get("content-length", "")
    return int(declared) if declared.isdigit() else 0


def _invalid(error: json.JSONDecodeError) -> RequestValidationError:
    """The error FastAPI raises for malformed JSON (answered by the same handler)."""
    return RequestValidationError(
        [{"type": "json_invalid", "loc": ("body", error.pos), "msg": "JSON decode error"}]
    )
