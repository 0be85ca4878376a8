"""Build and run the private tier's gRPC server: secure port only, mutual TLS, health service."""

from __future__ import annotations

import asyncio
import base64
import binascii
import signal
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]

from private_core.activation_monitor import (
    ActivationMonitor,
    monitored_models,
    single_threaded_blas,
)
from private_core.attribution import Attributor
from private_core.auth import IdentityInterceptor, IdentityRule
from private_core.budgets import BudgetGate, open_budgets
from private_core.hardening import protect_process_memory
from private_core.ledger_service import LEDGER_SERVICE, LedgerService, add_ledger_service
from private_core.metrics import PrivateMetrics, start_metrics_server
from private_core.model_store import ModelStore, load_store
from private_core.private_redis import check_private_store
from private_core.runner import Batcher, build_runner, configure_torch_threads, message_limit
from private_core.servicer import PrivateInferenceServicer
from private_core.settings import PrivateSettings
from private_core.signers import SignatureState, open_signature_state
from private_core.state import StateLock, lock_state_dir, require_writable_state
from private_core.store_health import keep_store_health
from private_core.watermark.triggers import TRIGGER_DIR
from protos import inference_pb2_grpc
from shared import phases
from shared.cert_expiry import watch_certificates
from shared.heap import freeze_startup_objects
from shared.keys import KeyProvider, LocalFileKeyProvider
from shared.layout import TierDir
from shared.logs import get_logger
from shared.signatures import deployment_id
from shared.state_files import check_state_dir

log = get_logger(__name__)
SERVICE_NAME = "splitvault.v1.PrivateInference"


@dataclass
class PrivateServer:
    """A started private tier: the gRPC server, the port it bound and its health servicer."""

    server: grpc.aio.Server
    port: int
    health: Any  # grpc_health aio HealthServicer (untyped)
    store: ModelStore
    executor: ThreadPoolExecutor
    metrics: PrivateMetrics
    metrics_port: int | None
    batcher: Batcher | None = None
    ledger: LedgerService | None = None
    budgets: BudgetGate | None = None
    signatures: SignatureState | None = None
    background: list[asyncio.Task[None]] = field(default_factory=list)
    state_lock: StateLock | None = None  # the state folder's, released last by stop

    async def stop(self, grace_s: float) -> None:
        """Report NOT_SERVING, let in-flight calls finish within ``grace_s``, then stop."""
        for task in self.background:
            task.cancel()
        await asyncio.gather(*self.background, return_exceptions=True)
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)
        if self.batcher is not None:
            await self.batcher.close()
        if self.budgets is not None:
            await self.budgets.close()
        self.executor.shutdown(wait=True)
        await asyncio.to_thread(self.store.close)  # trigger records still queued
        self.metrics.stop()
        if self.ledger is not None:
            self.ledger.close()
        if self.signatures is not None:
            self.signatures.close()
        if self.state_lock is not None:
            self.state_lock.release()


def key_provider(settings: PrivateSettings) -> KeyProvider:
    """The KEK provider named by the settings (a file, or the secret's base64 value)."""
    if settings.kek_file is not None:
        return LocalFileKeyProvider.load(settings.kek_file)
    if settings.kek is None:
        raise ValueError("no KEK configured")
    try:
        return LocalFileKeyProvider.from_bytes(
            base64.b64decode(settings.kek.get_secret_value().strip())
        )
    except (binascii.Error, ValueError):
        raise ValueError("the KEK secret is not a base64-encoded 32-byte key") from None


def server_credentials(tier: TierDir) -> grpc.ServerCredentials:
    """Mutual TLS: present the server certificate, require a client certificate from our CA."""
    return grpc.ssl_server_credentials(
        [((tier.tls / "server.key").read_bytes(), (tier.tls / "server.crt").read_bytes())],
        root_certificates=tier.ca_cert.read_bytes(),
        require_client_auth=True,
    )


def identity_rules(settings: PrivateSettings) -> tuple[IdentityRule, IdentityRule]:
    """Who may call inference, and who the health service: the public replicas (by name or
    prefix) for both, and ``health_identities`` too for health."""
    prefixes = tuple(settings.allowed_identity_prefixes)
    inference = IdentityRule(frozenset(settings.allowed_identities), prefixes)
    health = IdentityRule(inference.names | set(settings.health_identities), prefixes)
    return inference, health


async def build_server(settings: PrivateSettings) -> PrivateServer:
    """Check and lock the state folder, load the models, then bind and start the server (port
    0 binds a free port). ``StateUnwritable`` (logged) when the state folder cannot be written,
    ``StateLocked`` (logged) when another private tier holds it, ``AdmissionStateError``
    (logged) when its admission counters cannot be read, ``PrivateStoreRefused`` (logged) when
    its shared store is not one it may trust. The lock is held until ``PrivateServer.stop``."""
    require_writable_state(settings.state_dir)
    state_lock = lock_state_dir(settings.state_dir)
    try:
        running = await _build_locked(settings)
    except BaseException:
        state_lock.release()  # an in-process tier that failed to start holds nothing
        raise
    running.state_lock = state_lock
    return running


async def _build_locked(settings: PrivateSettings) -> PrivateServer:
    """``build_server`` once this process holds the state folder."""
    configure_torch_threads(settings.torch_threads, settings.torch_interop_threads)
    single_threaded_blas()  # NumPy (activation monitor, watermark): small products only
    if settings.debug_phase_marks:  # a lone request's breakdown (bench/phase_breakdown.py)
        phases.enable()
    tier = TierDir(settings.tier_dir)
    # The trigger log's folder: 0700/0600, tightened or refused.
    check_state_dir(settings.state_dir, create=False)
    provider = key_provider(settings)
    store = load_store(tier, provider, settings.state_dir / TRIGGER_DIR)
    metrics = PrivateMetrics.create(store.status())
    for name in store.failed:
        metrics.model_load_error(name)
    metrics.set_models_loaded(len(store.loaded))
    executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="back-stage")
    limit = message_limit(settings.max_message_mb * 1024 * 1024, store.loaded)
    identities, health_identities = identity_rules(settings)
    server = grpc.aio.server(
        interceptors=[IdentityInterceptor(identities, health_identities)],
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
        ],
    )
    if settings.state_store.redis_url is not None:  # several private replicas share it
        await asyncio.to_thread(check_private_store, settings.state_store, settings.tier_dir.parent)
    budgets = open_budgets(settings, metrics)
    signatures, attributor = build_attributor(settings, tier)
    monitor = None
    if not settings.activation_monitor.enabled or settings.activation_monitor.action == "record":
        log.warning(
            "unsafe_setting",
            setting="activation_monitor",
            enabled=settings.activation_monitor.enabled,
            action=settings.activation_monitor.action,
        )
    if settings.activation_monitor.enabled:
        monitor = ActivationMonitor(
            settings.activation_monitor, monitored_models(store.loaded), metrics.registry
        )
    runner, batcher = build_runner(store, executor, metrics, settings, budgets, attributor, monitor)
    inference_pb2_grpc.add_PrivateInferenceServicer_to_server(
        PrivateInferenceServicer(store, runner, metrics, identities, limit), server
    )
    ledger = add_ledger_service(
        server,
        settings.state_dir,
        settings.replica_id,
        IdentityRule(
            frozenset(settings.anchor_identities), tuple(settings.allowed_identity_prefixes)
        ),
        metrics.registry,
        provider,
    )
    health_servicer = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_secure_port(f"{settings.host}:{settings.port}", server_credentials(tier))
    freeze_startup_objects()  # before serving: the models stay out of the collector's passes
    await server.start()
    status = _serving_status(store)
    await health_servicer.set("", status)
    await health_servicer.set(SERVICE_NAME, status)
    await health_servicer.set(LEDGER_SERVICE, ledger.health_status)
    ledger_health = asyncio.create_task(ledger.keep_health(health_servicer))
    background = [ledger_health]
    if settings.state_store.redis_url is not None:  # NOT_SERVING while the store is down
        store_health = keep_store_health(
            health_servicer, ("", SERVICE_NAME), status, settings.state_store, metrics.registry
        )
        background.append(asyncio.create_task(store_health))
    metrics_port = None
    if settings.metrics_port is not None:
        metrics_port = start_metrics_server(metrics, settings.metrics_host, settings.metrics_port)
    log.info(
        "private_tier_listening",
        host=settings.host,
        port=port,
        metrics_port=metrics_port,
        models=sorted(store.loaded),
        failed=sorted(store.failed),
    )
    budgets.start()
    return PrivateServer(
        server,
        port,
        health_servicer,
        store,
        executor,
        metrics,
        metrics_port,
        batcher,
        ledger=ledger,
        budgets=budgets,
        signatures=signatures,
        background=background,
    )


def build_attributor(settings: PrivateSettings, tier: TierDir) -> tuple[SignatureState, Attributor]:
    """The signature state (state folder, or the private store) and the checks that use it."""
    state = open_signature_state(
        settings.state_store, settings.state_dir, settings.signature_window_s
    )
    deployment = deployment_id(tier.ca_cert.read_bytes())
    return state, Attributor(state, state, deployment, settings.signature_window_s)


def _serving_status(store: ModelStore) -> Any:
    """SERVING only when every deployed model loaded: a tier that lost a model (a stale KEK, a
    tampered file) must not pass its probes. Still serves the models it holds."""
    if not store.failed:
        return health_pb2.HealthCheckResponse.SERVING
    log.error(
        "private_tier_not_serving",
        reason=f"{len(store.failed)} model(s) failed to load",
        failed=dict(sorted(store.failed.items())),
    )
    return health_pb2.HealthCheckResponse.NOT_SERVING


async def serve(settings: PrivateSettings) -> None:
    """Run until SIGTERM or SIGINT, then drain gracefully."""
    protect_process_memory(settings.lock_memory)
    running = await build_server(settings)
    tier = TierDir(settings.tier_dir)
    stop_watch = watch_certificates(
        [tier.tls / "server.crt", tier.ca_cert], settings.cert_warning_days
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("private_tier_stopping", grace_s=settings.grace_period_s)
    await running.stop(settings.grace_period_s)
    stop_watch.set()
