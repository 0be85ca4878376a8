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

A request's body is read only when the application asks for it: once a request head is parsed
the connection stops reading until the application's first ``receive`` (a TLS connection still
decrypts up to ``READ_BUFFER_BYTES`` ahead, then stops reading its socket too). So a request
refused from its headers (a missing API key) is answered having read at most that much of its
body; the refusal carries ``Connection: close``; and a connection closed with its request body
unread is dropped: nothing more is read (a TLS close would read on, up to the client's
close_notify; a close with unread data resets the connection anyway) and it is aborted
``linger_s`` after the answer, the time for the answer to reach the client (at once while
``MAX_LINGERING`` dropped connections already wait).

Open connections plus running requests are bounded by uvicorn's ``limit_concurrency``; here,
instead of uvicorn's plain-text 503, a request beyond it is handed to the application marked
``overloaded`` (``RequestContext``), which refuses it with the JSON 503 and audits it. A body
read deadline that closes a connection marks the request ``closed`` the same way.

Also bounded, by uvicorn: idle time between requests (keep-alive) and the drain on shutdown.
The TLS handshake is bounded by asyncio's default (60 s), which uvicorn does not expose; a
connection counts against the limit only once it completes.
"""

from __future__ import annotations

import asyncio
import weakref
from typing import Any, Literal

import h11
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.h11_impl import H11Protocol, RequestResponseCycle

from public_api.context import RequestContext
from shared.logs import get_logger

log = get_logger(__name__)
Phase = Literal["headers", "body", "linger"]
HEAD_SLICE = 1024  # a head may exceed the cap by less than this before it is refused
READ_BUFFER_BYTES = 16 * 1024  # TLS: bytes decrypted ahead of the application, at most
# Dropped connections waiting out their linger at once (each holds its TLS buffers); beyond,
# a dropped connection is reset as soon as its answer is written.
MAX_LINGERING = 32


class BodyOnDemand(FlowControl):
    """Flow control that can hold a request's body unread until the application asks."""

    def __init__(self, transport: asyncio.Transport) -> None:
        super().__init__(transport)
        self.held = False
        set_limits = getattr(transport, "set_read_buffer_limits", None)
        if set_limits is not None:  # TLS: decrypt little ahead of what the application reads
            set_limits(high=READ_BUFFER_BYTES)

    def hold(self) -> None:
        """Read nothing more until ``resume_reading`` (the application's ``receive``)."""
        self.held = True
        self.pause_reading()

    def resume_reading(self) -> None:
        self.held = False
        super().resume_reading()


class CycleTransport(asyncio.Transport):
    """The transport as one request's cycle sees it: closing it while the request's body is
    unread drops the connection (``BoundedH11Protocol.drop``) instead of closing it."""

    def __init__(self, inner: asyncio.Transport, protocol: BoundedH11Protocol) -> None:
        super().__init__()
        self._inner = inner
        # Weak: a reference cycle would keep each connection (and its TLS buffers) alive
        # until the collector's next full pass.
        self._protocol = weakref.ref(protocol)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._inner.write(data)

    def is_closing(self) -> bool:
        protocol = self._protocol()
        return self._inner.is_closing() or (protocol is not None and protocol.dropping)

    def close(self) -> None:
        protocol = self._protocol()
        if protocol is not None and protocol.conn.their_state is h11.SEND_BODY:
            protocol.drop()
        else:
            self._inner.close()

    def abort(self) -> None:
        self._inner.abort()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._inner.get_extra_info(name, default)


class BoundedH11Protocol(H11Protocol):
    """``H11Protocol`` with deadlines on reading a request's headers and its body, bodies read
    on demand and connections dropped, not closed, when a body is left unread."""

    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    # A dropped connection: time for its answer to arrive (with one retransmission at Linux's
    # 200 ms minimum RTO) before the connection is reset.
    linger_s: float = 0.25
    lingering = 0  # dropped connections of this process waiting out their linger now

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self._phase: Phase | None = None
        self._max_concurrency, self.limit_concurrency = self.limit_concurrency, None
        self.app = self._mark_overload(self.app)
        self._seen: RequestResponseCycle | None = None
        self.dropping = False
        self._lingers = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]
        self.flow = self._body_on_demand = BodyOnDemand(self.transport)
        self._expect("headers")

    def _mark_overload(self, app: ASGIApp) -> ASGIApp:
        """``app``, with requests past ``limit_concurrency`` marked ``overloaded``."""
        limit, connections, tasks = self._max_concurrency, self.connections, self.tasks
        if limit is None:
            return app

        async def marked(scope: Scope, receive: Receive, send: Send) -> None:
            # This request's own task is already counted (uvicorn checks before creating it).
            if len(connections) >= limit or len(tasks) > limit:
                RequestContext.of(scope).overloaded = True
            await app(scope, receive, send)

        return marked  # (no reference to the protocol: no cycle through it)

    def handle_events(self) -> None:
        if self.dropping:
            return
        super().handle_events()
        cycle = self.cycle
        if cycle is not None and cycle is not self._seen:  # a new request
            self._seen = cycle
            cycle.transport = CycleTransport(self.transport, self)
            if self.conn.their_state is h11.SEND_BODY:
                self._body_on_demand.hold()  # its first ``receive`` resumes reading

    def drop(self) -> None:
        """End a connection whose request body is unread, once its answer is written: read
        nothing more (a TLS close would read on, up to the client's close_notify, and a close
        with unread data resets the connection anyway), then abort after ``linger_s``."""
        if self.dropping:
            return
        self.dropping = True
        self.flow.pause_reading()
        if self.cycle is not None:
            self.cycle.body = bytearray()  # what was read of the body is not needed
        if BoundedH11Protocol.lingering >= MAX_LINGERING:  # a flood: no time to spare
            self.transport.abort()
            return
        BoundedH11Protocol.lingering += 1
        self._lingers = True
        self._expect("linger")

    def shutdown(self) -> None:
        if self.dropping:
            self.transport.abort()
        else:
            super().shutdown()

    def data_received(self, data: bytes) -> None:
        if self.dropping:
            return
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
        if self.dropping:  # nothing more is read or answered on this connection
            return
        super().on_response_complete()
        if self.conn.their_state is h11.IDLE:  # between requests: keep-alive bounds the wait
            self._expect(None)
        else:
            self._follow()

    def connection_lost(self, exc: Exception | None) -> None:
        self._expect(None)
        if self._lingers:
            self._lingers = False
            BoundedH11Protocol.lingering -= 1
        super().connection_lost(exc)

    def _follow(self) -> None:
        """Arm the deadline that matches what the client still has to send."""
        state = self.conn.their_state
        if self.dropping:
            return
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
            delays = {"headers": self.header_timeout_s, "body": self.body_timeout_s}
            self._deadline = self.loop.call_later(delays.get(phase, self.linger_s), self._expired)

    def _expired(self) -> None:
        self._deadline = None
        if self.transport is None:
            return
        if self._phase == "linger":  # the answer had its time; the rest is not read
            self.transport.abort()
            return
        if self.transport.is_closing():
            return
        log.info("http_read_timeout", phase=self._phase, client=_client(self.client))
        if self._phase == "body" and self.cycle is not None:
            RequestContext.of(self.cycle.scope).closed = "timeout"
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
