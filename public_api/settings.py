"""Public tier settings (``public.toml``, ``SPLITVAULT_PUBLIC_*`` environment, secrets)."""

from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from public_api.front_batch_settings import FrontBatchSettings
from public_api.protection_settings import ProtectionSettings
from public_api.sealing_settings import SealingSettings
from shared.layout import PRIVATE_IDENTITY, DeployLayout
from shared.settings import TierSettings, configured_state_dir

ENV_PREFIX = "SPLITVAULT_PUBLIC_"


class PublicSettings(TierSettings):
    """Where the public tier's folder is, how it listens and how it reaches the private tier."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid"
    )

    host: str = "127.0.0.1"
    port: int = Field(default=8443, ge=0, le=65535)
    # SO_REUSEPORT on the listening socket, as gRPC sets by default: a new process of the same
    # user can bind the port while the old one drains (a restart on one host without refusals).
    reuse_port: bool = False
    # One or more private-tier replicas ("host:port"), balanced round robin.
    private_addresses: list[str] = Field(min_length=1)
    # The name the private tier's certificate is checked against, whatever address is dialled.
    private_server_name: str = PRIVATE_IDENTITY
    # This replica's client certificate for the private tier (client.crt, client.key), whose
    # CN the private tier counts budgets against: tls/ of the tier folder by default; another
    # replica mounts its own (`splitvault certs add-public`) and names the folder here.
    client_tls_dir: Path | None = None
    # Serve plain HTTP: only behind a TLS-terminating proxy, and only when asked for.
    insecure_http: bool = False
    # Proxies (IP addresses or CIDR networks) whose X-Forwarded-For and X-Forwarded-Proto are
    # believed. Empty (default): those headers are ignored and the client address, audited and
    # limited, is the TCP peer's. Behind a proxy, name exactly the proxy's own addresses.
    trusted_proxies: list[str] = Field(default_factory=list)
    # Prometheus metrics (per-key risk scores, limit counters) on a separate plain-HTTP
    # listener for the internal network only; the public port answers /metrics with 404.
    # Port 0 binds a free port (logged in public_tier_listening); None: no metrics listener.
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = Field(default=9465, ge=0, le=65535)
    # The v2 gRPC inference service (tritonclient.grpc and other Open Inference Protocol
    # clients) on host:grpc_port, over TLS with the HTTPS certificate, behind the same keys,
    # terms, limits, monitor and audit. 0 binds a free port (logged in grpc_ingress_listening);
    # None (default): no gRPC ingress.
    grpc_port: int | None = Field(default=None, ge=0, le=65535)
    request_timeout_s: float = Field(default=5.0, gt=0, le=300)
    max_body_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    max_elements: int = Field(default=4 * 1024 * 1024, ge=1)
    max_message_mb: int = Field(default=64, ge=4, le=2047)
    torch_threads: int = Field(default_factory=lambda: max(1, (os.cpu_count() or 2) // 2), ge=1)
    front_workers: int = Field(default=2, ge=1, le=64)
    # Intra-op threads for the front stage of a request alone in this tier (no other request
    # in flight; shared/compute_threads.py): None = every core this process may use. Set it to
    # torch_threads to turn off.
    lone_request_threads: int | None = Field(default=None, ge=1, le=1024)
    # A front-stage call expected (rows x the stage's cost per row, timed at startup) to take
    # less than this runs on the event loop instead of a worker thread; 0: always in a thread.
    front_inline_below_ms: float = Field(default=0.5, ge=0, le=10)
    # Concurrent front-stage calls of one model run as one batch (public_api/front_batcher.py).
    front_batching: FrontBatchSettings = FrontBatchSettings()
    # Debug: log each request's phase marks (shared/phases.py, bench/phase_breakdown.py --lone);
    # meaningful only for requests sent one at a time. Off: no cost.
    debug_phase_marks: bool = False
    # Slow and idle HTTP clients (public_api/connection.py): a request's headers must arrive
    # within header_timeout_s of the connection (or the request's first byte), its body within
    # body_timeout_s of the headers; an idle keep-alive connection closes after keep_alive_s.
    # Request line plus headers are capped at max_header_bytes; beyond max_connections open
    # connections (or running requests) new requests get 503. shutdown_grace_s: drain on SIGTERM.
    header_timeout_s: float = Field(default=10.0, gt=0, le=300)
    body_timeout_s: float = Field(default=30.0, gt=0, le=3600)
    keep_alive_s: int = Field(default=5, ge=1, le=300)
    max_header_bytes: int = Field(default=16 * 1024, ge=1024, le=1024 * 1024)
    max_connections: int = Field(default=1000, ge=1)
    shutdown_grace_s: int = Field(default=10, ge=0, le=600)
    retry_after_s: int = Field(default=1, ge=1)
    log_level: str = "INFO"
    # Log certificate_expiring when a certificate this tier loaded expires within this many days.
    cert_warning_days: float = Field(default=30.0, ge=0)
    protection: ProtectionSettings = ProtectionSettings()
    # Served request bodies sealed to the owner's public key (public_api/sealing.py).
    sealing: SealingSettings = SealingSettings()
    # Swagger UI (/docs) and ReDoc (/redoc) pages; they load their scripts from a public CDN
    # (jsDelivr), so they are off by default. /openapi.json is served either way.
    docs_enabled: bool = False
    # Where API keys, terms acceptances, monitor decisions and the audit trail live
    # (public_api/state_backend.py): "sqlite" in state_dir, for one host; "postgres" in one
    # PostgreSQL database every replica shares, its DSN read from the secret file
    # postgres_dsn_file. replica_name names this replica's audit chain there (default: the
    # host name, a pod's name in Kubernetes); postgres_timeout_s bounds a connection or a wait
    # for one, after which requests get 503 + Retry-After.
    state_backend: Literal["sqlite", "postgres"] = "sqlite"
    postgres_dsn_file: Path | None = None
    replica_name: str = Field(default_factory=socket.gethostname, min_length=1, max_length=128)
    postgres_timeout_s: float = Field(default=2.0, gt=0, le=60)

    @property
    def client_tls(self) -> Path:
        """The folder of this replica's client certificate and key."""
        return self.client_tls_dir or self.tier_dir / "tls"

    @property
    def terms_file(self) -> Path:
        """The terms of service text the operator publishes."""
        return self.tier_dir / "terms.md"

    @model_validator(mode="after")
    def _proxies_are_addresses(self) -> PublicSettings:
        for proxy in self.trusted_proxies:
            try:
                ipaddress.ip_network(proxy, strict=False)
            except ValueError:
                raise ValueError(
                    f"trusted proxy {proxy!r} must be an IP address or a CIDR network"
                ) from None
        return self

    @model_validator(mode="after")
    def _postgres_has_dsn(self) -> PublicSettings:
        if self.state_backend == "postgres" and self.postgres_dsn_file is None:
            raise ValueError("state_backend 'postgres' needs postgres_dsn_file (the DSN's file)")
        return self

    @model_validator(mode="after")
    def _addresses_have_ports(self) -> PublicSettings:
        for address in self.private_addresses:
            host, _, port = address.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"private address {address!r} must be host:port")
        return self


def public_state_dir(deploy: Path) -> Path:
    """The public tier's state (API keys, terms acceptances, audit trail, monitor log) of a
    deployment, where the tier's settings put it; ``FileNotFoundError`` if not a deployment."""
    layout = DeployLayout(deploy)
    if not layout.public.root.is_dir():
        raise FileNotFoundError(
            f"{layout.public.root} does not exist: is {deploy} a deployment folder?"
        )
    return configured_state_dir(layout.public.root, layout.public_config, ENV_PREFIX)
