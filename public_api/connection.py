"""HTTP/1.1 connections with bounded reads: uvicorn's h11 protocol plus two read deadlines.

uvicorn bounds the idle time between two requests of a connection (keep-alive) but not the
time a client takes to send one: a client that opens a connection and sends nothing, or sends
its headers or body a byte at a time, would hold the connection (and its memory) for ever.
``bounded_protocol`` returns an ``H11Protocol`` that also closes a connection whose request
headers are not complete ``header_timeout_s`` after the connection opened or the request's
first byte arrived, or whose body is not complete ``body_timeout_s`` after its headers.
h11 bounds the request line plus headers (``h11_max_incomplete_event_size``: larger gets a 400
and the connection is closed), but only while they are incomplete; so that a head arriving in
one large read is measured too, it is handed to h11 in slices of ``HEAD_SLICE`` bytes.

Also bounded, by uvicorn: idle time between requests (keep-alive), open connections plus
running requests (``limit_concurrency``: beyond it a request gets uvicorn's plain-text 503),
and the drain on shutdown. The TLS handshake is bounded by asyncio's default (60 s), which
uvicorn does not expose; a connection counts against the limit only once it completes.
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from shared.logs import get_logger

log = get_logger(__name__)
Phase = Literal["headers", "body"]
HEAD_SLICE = 1024  # a head may exceed the cap by less than this before it is refused


class BoundedH11Protocol(H11Protocol):
    """``H11Protocol`` with deadlines on reading a request's headers and its body."""

    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self._phase: Phase | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]
        self._expect("headers")

    def data_received(self, data: bytes) -> None:
        while len(data) > HEAD_SLICE and self._reading_head():
            super().data_received(data[:HEAD_SLICE])
            data = data[HEAD_SLICE:]
        if data and not self.transport.is_closing() and self.conn.their_state is not h11.ERROR:
            super().data_received(data)
        self._follow()

    def _reading_head(self) -> bool:
        """Whether h11 is still reading a request's line and headers (and may take more)."""
        return self.conn.their_state is h11.IDLE and not self.transport.is_closing()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.conn.their_state is h11.IDLE:  # between requests: keep-alive bounds the wait
            self._expect(None)
        else:
            self._follow()

    def connection_lost(self, exc: Exception | None) -> None:
        self._expect(None)
        super().connection_lost(exc)

    def _follow(self) -> None:
        """Arm the deadline that matches what the client still has to send."""
        state = self.conn.their_state
        if state is h11.IDLE:
            self._expect("headers")  # part of a request line or headers has arrived
        elif state is h11.SEND_BODY:
            self._expect("body")
        else:
            self._expect(None)

    def _expect(self, phase: Phase | None) -> None:
        if phase == self._phase:
            return  # the deadline runs from the start of the phase, not from the last byte
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._phase = phase
        if phase is not None:
            delay = self.header_timeout_s if phase == "headers" else self.body_timeout_s
            self._deadline = self.loop.call_later(delay, self._expired)

    def _expired(self) -> None:
        self._deadline = None
        if self.transport is None or self.transport.is_closing():
            return
        log.info("http_read_timeout", phase=self._phase, client=_client(self.client))
        # abort, not close: a TLS close would wait for the slow client's close_notify.
        self.transport.abort()


def bounded_protocol(header_timeout_s: float, body_timeout_s: float) -> type[H11Protocol]:
    """A ``BoundedH11Protocol`` subclass with these deadlines (uvicorn's ``http`` setting)."""
    return type(
        "SplitVaultH11Protocol",
        (BoundedH11Protocol,),
        {"header_timeout_s": header_timeout_s, "body_timeout_s": body_timeout_s},
    )


def _client(address: tuple[str, int] | None) -> str:
    return "unknown" if address is None else f"{address[0]}:{address[1]}"
