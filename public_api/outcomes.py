"""Every request ends with an answer and, for inference, an audit record (pure ASGI).

* An exception no handler took becomes a JSON 500 here, logged, instead of reaching uvicorn,
  which would close the kept-alive connection after the response without saying so (the
  client's next request on it then fails with "server disconnected").
* An answer sent before the request's body was read to its end carries ``Connection: close``:
  the rest of the body is never read, nor taken for the next request.
* An inference request whose outcome nothing audited yet (a refusal before the route, a 413 from
  the body limit, a 500, a connection closed by a read deadline or by the client) is audited
  here, through ``Protection.record_outcome``.
"""

from __future__ import annotations

from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from public_api.context import RequestContext
from public_api.errors import error_response
from shared.logs import get_logger

log = get_logger(__name__)
_CLOSE = (b"connection", b"close")


class Outcomes:
    """Answer unhandled errors, close connections with unread bodies, audit every outcome."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        context = RequestContext.of(scope)
        body_read = not _has_body(scope)
        status: int | None = None
        complete = False

        async def tracked_receive() -> Message:
            nonlocal body_read
            message = await receive()
            if message["type"] == "http.request" and not message.get("more_body", False):
                body_read = True
            elif message["type"] == "http.disconnect" and not body_read and not context.closed:
                context.closed = "client"
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal status, complete
            if message["type"] == "http.response.start":
                status = int(message["status"])
                headers = list(message.get("headers", []))
                if not body_read and _CLOSE not in headers:
                    message = {**message, "headers": [*headers, _CLOSE]}
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                complete = True
            await send(message)

        try:
            await self.app(scope, tracked_receive, tracked_send)
        except ClientDisconnect:  # nobody to answer
            context.closed = context.closed or "client"
        except Exception as error:
            log.error("unhandled_error", error=type(error).__name__, detail=str(error)[:300])
            if status is None:
                answer = error_response(500, "internal error", scope=scope)
                await answer(scope, tracked_receive, tracked_send)
            elif not complete:
                raise  # half an answer went out: only closing the connection is left
        finally:
            if context.inference and not context.audited:
                context.audited = True
                scope["app"].state.splitvault.protection.record_outcome(context, status or 500)


def _has_body(scope: Scope) -> bool:
    for name, value in scope["headers"]:
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip() != b"0"):
            return True
    return False
