"""Run the public tier under uvicorn, over HTTPS unless plain HTTP is explicitly configured."""

from __future__ import annotations

import signal
import socket
from types import FrameType

import uvicorn

from public_api.app import create_app, public_metrics
from public_api.connection import bounded_protocol
from public_api.settings import PublicSettings
from public_api.unsafe import unsafe_settings
from shared.cert_expiry import watch_certificates
from shared.layout import TierDir
from shared.logs import get_logger
from shared.state_files import check_state_dir

log = get_logger(__name__)


def bind_socket(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """Bind the listening socket ourselves so port 0 gives a known free port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def serve(settings: PublicSettings) -> None:
    """Serve until SIGTERM/SIGINT; uvicorn drains in-flight requests before exiting."""
    tier = TierDir(settings.tier_dir)
    check_state_dir(settings.state_dir, create=True)  # 0700/0600, tightened or refused
    tls: dict[str, str] = {}
    if not settings.insecure_http:
        tls = {
            "ssl_certfile": str(tier.tls / "server.crt"),
            "ssl_keyfile": str(tier.tls / "server.key"),
        }
    unsafe = unsafe_settings(settings)
    for setting in unsafe:
        log.warning(
            "unsafe_setting", setting=setting.name, value=setting.value, effect=setting.effect
        )
    metrics = public_metrics(settings)
    metrics.set_unsafe_settings((setting.name, setting.value) for setting in unsafe)
    sock = bind_socket(settings.host, settings.port, reuse_port=settings.reuse_port)
    config = uvicorn.Config(
        create_app(settings, metrics),
        log_config=None,
        access_log=False,
        # Bounded connections (see PublicSettings): h11 with header-size and read deadlines.
        http=bounded_protocol(settings.header_timeout_s, settings.body_timeout_s),
        h11_max_incomplete_event_size=settings.max_header_bytes,
        limit_concurrency=settings.max_connections,
        timeout_graceful_shutdown=settings.shutdown_grace_s,
        timeout_keep_alive=settings.keep_alive_s,
        server_header=False,
        # X-Forwarded-For/-Proto only from the proxies named in trusted_proxies (uvicorn would
        # otherwise believe them from 127.0.0.1, so that a local proxy passing the client's
        # header through lets the client choose its address).
        proxy_headers=bool(settings.trusted_proxies),
        forwarded_allow_ips=list(settings.trusted_proxies),
        **tls,  # type: ignore[arg-type]
    )
    metrics_port = None
    if settings.metrics_port is not None:
        metrics_port = metrics.serve(
            settings.metrics_host, settings.metrics_port, reuse_port=settings.reuse_port
        )
    log.info(
        "public_tier_listening",
        host=settings.host,
        port=sock.getsockname()[1],
        scheme="http" if settings.insecure_http else "https",
        metrics_host=settings.metrics_host if metrics_port is not None else None,
        metrics_port=metrics_port,
        trusted_proxies=settings.trusted_proxies,
    )
    own = [settings.client_tls / "client.crt", tier.ca_cert]
    own += [] if settings.insecure_http else [tier.tls / "server.crt"]
    stop_watch = watch_certificates(own, settings.cert_warning_days)
    # uvicorn drains, then re-raises the SIGTERM it caught; with this handler that ends in a
    # clean exit (status 0) instead of death by signal.
    signal.signal(signal.SIGTERM, _exit_after_drain)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        stop_watch.set()
        metrics.stop()


def _exit_after_drain(_signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(0)
