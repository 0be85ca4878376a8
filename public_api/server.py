"""Run the public tier under uvicorn, over HTTPS unless plain HTTP is explicitly configured."""

from __future__ import annotations

import socket

import uvicorn

from public_api.app import create_app
from public_api.settings import PublicSettings
from shared.layout import TierDir
from shared.logs import get_logger

log = get_logger(__name__)


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind the listening socket ourselves so port 0 gives a known free port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def serve(settings: PublicSettings) -> None:
    """Serve until SIGTERM/SIGINT; uvicorn drains in-flight requests before exiting."""
    tier = TierDir(settings.tier_dir)
    tls: dict[str, str] = {}
    if not settings.insecure_http:
        tls = {
            "ssl_certfile": str(tier.tls / "server.crt"),
            "ssl_keyfile": str(tier.tls / "server.key"),
        }
    sock = bind_socket(settings.host, settings.port)
    config = uvicorn.Config(
        create_app(settings),
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=10,
        timeout_keep_alive=5,
        server_header=False,
        **tls,  # type: ignore[arg-type]
    )
    log.info(
        "public_tier_listening",
        host=settings.host,
        port=sock.getsockname()[1],
        scheme="http" if settings.insecure_http else "https",
    )
    uvicorn.Server(config).run(sockets=[sock])
