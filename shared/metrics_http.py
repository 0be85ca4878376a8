"""A metrics-only HTTP listener: one Prometheus registry in plain text, in a daemon thread.

Internal by design: bind it to loopback or an internal interface, never the public one. It serves
the exposition on every path and nothing else (no request body is read).
"""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer, _SilentHandler


@dataclass
class MetricsListener:
    """A running listener; ``stop`` shuts it down and closes its socket."""

    server: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        """The bound port (the one asked for, or the one port 0 got)."""
        return int(self.server.server_port)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


def serve_metrics(
    registry: CollectorRegistry, host: str, port: int, *, reuse_port: bool = False
) -> MetricsListener:
    """Serve ``registry`` on ``host:port`` (port 0: a free one). ``reuse_port`` sets
    ``SO_REUSEPORT``, so a restarted process binds while the old one drains."""
    family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]

    class Server(ThreadingWSGIServer):
        address_family = family
        allow_reuse_port = reuse_port

    server = make_server(
        str(address[0]), port, make_wsgi_app(registry), Server, handler_class=_SilentHandler
    )
    thread = threading.Thread(target=server.serve_forever, name="metrics", daemon=True)
    thread.start()
    return MetricsListener(server, thread)
