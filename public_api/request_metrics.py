"""Count every inference request by model and status, and time it (pure ASGI)."""

from __future__ import annotations

import re
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from public_api.metrics import PublicMetrics
from shared import phases

_MODEL_PATH = re.compile(r"^/v2/models/([^/]+)/infer$")


class RequestMetrics:
    """Observe status and latency of ``POST /v2/models/{model}/infer`` requests."""

    def __init__(self, app: ASGIApp, metrics: PublicMetrics) -> None:
        self.app = app
        self.metrics = metrics  # it labels models it does not serve as "unknown"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        match = _MODEL_PATH.match(scope.get("path", "")) if scope["type"] == "http" else None
        if match is None:
            await self.app(scope, receive, send)
            return
        model = match.group(1)
        phases.mark("public_in")
        started = time.perf_counter()
        status = 500

        async def observe(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                phases.mark("response_encoded")
            await send(message)

        try:
            await self.app(scope, receive, observe)
        finally:
            self.metrics.observe_request(model, status, time.perf_counter() - started)
            phases.mark("public_out")
            phases.flush("request_phases", tier="public")
