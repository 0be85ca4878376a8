"""Pure ASGI middlewares: a body size limit enforced while streaming, and a fixed Link header."""

from __future__ import annotations

import json

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from public_api.errors import error_body, error_code
from shared.errors import PayloadTooLarge


class BodySizeLimit:
    """413 for a declared body over ``max_bytes``; a streamed one raises a 413 ``HTTPException``.

    (FastAPI turns any other exception raised while reading the body into a 400.)
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await _refuse(scope, send, self.max_bytes)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413, f"request body exceeds {self.max_bytes} bytes")
            return message

        await self.app(scope, limited_receive, send)


async def _refuse(scope: Scope, send: Send, max_bytes: int) -> None:
    message = f"request body exceeds {max_bytes} bytes"
    body = json.dumps(error_body(scope, 413, message, error_code(PayloadTooLarge))).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 413, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class LinkHeader:
    """Adds one fixed header (the terms-of-service ``Link``) to every HTTP response."""

    def __init__(self, app: ASGIApp, value: str) -> None:
        self.app = app
        self.value = value.encode("latin-1")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_link(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [*message.get("headers", []), (b"link", self.value)]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, with_link)
