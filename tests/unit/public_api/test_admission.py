"""Which routes get their API key checked before the body is read: those that declare it."""

from __future__ import annotations

from fastapi import APIRouter

from public_api.admission import guarded_routes
from public_api.deps import Admitted, Authenticated
from public_api.routes import router


def test_every_route_that_needs_a_key_is_guarded_and_inference_is_audited() -> None:
    guarded = {(g.route.path, g.inference) for g in guarded_routes(router.routes)}
    assert guarded == {
        ("/v2/models", False),
        ("/v2/repository/index", False),
        ("/v2/models/{model}", False),
        ("/v2/models/{model}/ready", False),
        ("/v2/models/{model}/infer", True),
        ("/v1/terms/accept", False),
    }


def test_a_new_ingress_is_guarded_by_declaring_its_caller() -> None:
    extra = APIRouter()

    @extra.post("/v1/embeddings/{model}")
    async def embeddings(model: str, caller: Admitted) -> dict[str, str]:
        return {"model": model}

    @extra.get("/v1/account")
    async def account(caller: Authenticated) -> dict[str, str | None]:
        return {"key": caller.key_id}

    @extra.get("/v1/status")
    async def status() -> dict[str, bool]:
        return {"up": True}

    guarded = {(g.route.path, g.inference) for g in guarded_routes(extra.routes)}
    assert guarded == {("/v1/embeddings/{model}", True), ("/v1/account", False)}


def test_embeddings_is_an_inference_route_whose_body_names_the_model() -> None:
    from public_api.embeddings_route import router as embeddings

    guarded = {(g.route.path, g.inference) for g in guarded_routes(embeddings.routes)}
    assert guarded == {("/v1/embeddings", True)}
