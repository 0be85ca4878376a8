"""``create_app(settings)``: the public tier's FastAPI application (v2 REST)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

import torch
from fastapi import FastAPI

from public_api.admission import Admission
from public_api.audit_anchor import start_anchoring
from public_api.embeddings_route import router as embeddings_router
from public_api.errors import install_error_handlers
from public_api.front import FrontRunner, load_front_stages, message_limit
from public_api.grpc_ingress_server import start_grpc_ingress
from public_api.limits import BodySizeLimit, LinkHeader
from public_api.metrics import PublicMetrics
from public_api.models import ModelSet
from public_api.openapi import install_openapi
from public_api.outcomes import Outcomes
from public_api.private_client import PrivateTierClient
from public_api.protection_factory import build_protection
from public_api.request_metrics import RequestMetrics
from public_api.routes import router
from public_api.sealing import build_sealer
from public_api.service import InferenceService
from public_api.settings import PublicSettings
from public_api.state import VERSION, PublicState
from public_api.state_backend import open_state
from public_api.terms import link_header
from public_api.text import load_text_encoders
from shared import phases
from shared.compute_threads import ComputeCallsCollector, ComputeThreads, usable_cores
from shared.heap import freeze_startup_objects
from shared.layout import TierDir
from shared.logs import get_logger

log = get_logger(__name__)


def public_metrics(settings: PublicSettings) -> PublicMetrics:
    """The tier's metrics, labelled with the models in its folder."""
    tier = TierDir(settings.tier_dir)
    models = [p.name for p in tier.models.iterdir() if p.is_dir()] if tier.models.is_dir() else []
    return PublicMetrics.create(models)


def create_app(settings: PublicSettings, metrics: PublicMetrics | None = None) -> FastAPI:
    """Build the app; front stages load and the private channel opens at startup.

    ``metrics`` are not served by the app: ``public_api.server`` serves them on the internal
    metrics listener.
    """
    metrics = metrics if metrics is not None else public_metrics(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        torch.set_num_threads(settings.torch_threads)
        if settings.debug_phase_marks:  # a lone request's breakdown (bench/phase_breakdown.py)
            phases.enable()
        executor = ThreadPoolExecutor(settings.front_workers, thread_name_prefix="front-stage")
        stages = load_front_stages(TierDir(settings.tier_dir))
        private = PrivateTierClient(settings, message_limit(settings, stages))
        threads = ComputeThreads(
            settings.lone_request_threads or usable_cores(), settings.torch_threads
        )
        calls = ComputeCallsCollector(threads)
        metrics.registry.register(calls)
        front = FrontRunner(
            executor,
            settings.front_inline_below_ms / 1000,
            threads,
            settings.front_batching,
            metrics.registry,
        )
        for stage in stages.values():
            front.calibrate(stage)
            front.batch(stage)
        models = ModelSet(stages, private)
        service = InferenceService(
            stages,
            front,
            private,
            max_elements=settings.max_elements,
            on_not_ready=models.refresh_soon,
            texts=load_text_encoders(
                TierDir(settings.tier_dir).models,
                {name: stage.manifest for name, stage in stages.items()},
            ),
        )
        state = open_state(settings)  # SQLite in state_dir, or the replicas' PostgreSQL
        protection = build_protection(settings, stages, metrics, state)
        anchorer = start_anchoring(
            protection.audit,
            state.receipts,
            private.anchor_audit,
            settings.protection.audit_anchor,
            metrics.registry,
        )
        await protection.start()
        sealer = build_sealer(settings.state_dir, settings.tier_dir, settings.sealing)
        tier = app.state.splitvault = PublicState(
            settings, service, private, protection, metrics, models, sealer
        )
        startup_check = asyncio.get_running_loop().create_task(models.check_at_startup())
        ingress = None
        if settings.grpc_port is not None:
            ingress = await start_grpc_ingress(settings, tier, settings.grpc_port)
        freeze_startup_objects()  # the front stages stay out of the collector's passes
        log.info("public_tier_ready", models=sorted(stages))
        try:
            yield
        finally:
            startup_check.cancel()
            if ingress is not None:
                await ingress.stop(settings.shutdown_grace_s)
            await protection.close()
            if sealer is not None:
                await asyncio.to_thread(sealer.close)
            if anchorer is not None:
                await anchorer.close()  # after the trail's last write, before the channel closes
            await asyncio.to_thread(state.close)
            await front.close()
            await private.close()
            executor.shutdown(wait=True)
            metrics.registry.unregister(calls)

    app = FastAPI(
        # Swagger UI and ReDoc load their scripts from a public CDN: off unless asked for
        # (the OpenAPI document itself is served either way, at /openapi.json).
        docs_url="/docs" if settings.docs_enabled else None,
        redoc_url="/redoc" if settings.docs_enabled else None,
        title="splitvault",
        version=VERSION,
        summary="Open Inference Protocol v2 endpoint of a split, protected model.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.include_router(router)
    app.include_router(embeddings_router)
    install_openapi(app)
    # Outermost last: metrics -> Link -> outcomes (audit, 500s) -> key check -> body limit.
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(Admission, routes=[*router.routes, *embeddings_router.routes])
    app.add_middleware(Outcomes)
    app.add_middleware(LinkHeader, value=link_header())
    app.add_middleware(RequestMetrics, metrics=metrics)
    return app
