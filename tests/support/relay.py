"""A TCP relay that connects onward from a chosen loopback address, as a NAT would.

gRPC's C-core client cannot bind a source address, so every gRPC client on this host reaches a
server from 127.0.0.1. A client that connects to the relay instead reaches the server from the
relay's ``source`` (127.0.0.N): the server sees that address as the peer of the connection, its
per-address limits and audit records apply to it. The relay copies bytes and knows nothing of
TLS or HTTP/2.
"""

from __future__ import annotations

import contextlib
import socket
import threading

_CHUNK = 1 << 16


class Relay:
    """Listens on 127.0.0.1 (``port``); each connection is relayed to ``127.0.0.1:target``
    from ``source``. A context manager: leaving it closes every connection."""

    def __init__(self, target: int, source: str) -> None:
        self.target, self.source = target, source
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self.connections = 0  # relayed so far
        self._sockets: list[socket.socket] = [self._listener]
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def __enter__(self) -> Relay:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:  # closed
                return
            server = socket.create_connection(
                ("127.0.0.1", self.target), timeout=10, source_address=(self.source, 0)
            )
            server.settimeout(None)
            self.connections += 1
            self._sockets += [client, server]
            for pair in ((client, server), (server, client)):
                thread = threading.Thread(target=_pump, args=pair, daemon=True)
                self._threads.append(thread)
                thread.start()

    def close(self) -> None:
        """Stop listening and end every relayed connection."""
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for thread in self._threads:
            thread.join(10)


def _pump(source: socket.socket, sink: socket.socket) -> None:
    """Copy ``source`` to ``sink`` until either ends; then end the other way too."""
    try:
        while chunk := source.recv(_CHUNK):
            sink.sendall(chunk)
    except OSError:
        pass
    with contextlib.suppress(OSError):
        sink.shutdown(socket.SHUT_WR)
