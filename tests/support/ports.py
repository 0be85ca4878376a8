"""Loopback ports a test holds for its whole life, for servers it restarts on the same address.

Tests never pick a "free" port to bind later: between the pick and the bind another process (or
an outgoing connection's ephemeral port) may take it. A server started once binds port 0 and
reports the port it bound. A server a test stops and starts again on the same address binds a
``ReservedPort``: a socket bound with ``SO_REUSEPORT`` that never listens. Servers that set
``SO_REUSEPORT`` too (the private tier: gRPC's default; the public tier with
``SPLITVAULT_PUBLIC_REUSE_PORT=1``) bind it as often as they are restarted, while no other
program can take it and the kernel never hands it out as an ephemeral port. While no server
listens, connections to it are refused, exactly as to a port nobody holds.
"""

from __future__ import annotations

import socket
from types import TracebackType

# The public tier setting that lets it bind a reserved port.
PUBLIC_REUSE_PORT = {"SPLITVAULT_PUBLIC_REUSE_PORT": "1"}


class ReservedPort:
    """A loopback TCP port held by a bound, non-listening ``SO_REUSEPORT`` socket."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            self._socket.bind((host, 0))
        except BaseException:
            self._socket.close()
            raise
        self.host = host
        self.port: int = self._socket.getsockname()[1]

    @property
    def address(self) -> str:
        """``host:port``."""
        return f"{self.host}:{self.port}"

    def close(self) -> None:
        """Release the port."""
        self._socket.close()

    def __enter__(self) -> ReservedPort:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
