"""Baseline: the unsplit model behind a plain FastAPI + uvicorn app, one forward per request.

This is the server most users write: a pydantic request model, a synchronous endpoint (FastAPI
runs it in its thread pool) calling the model, the answer returned as a dict. One process.

    python bench/baselines/plain_fastapi.py --port 8000 --digits-state digits.pt --minilm \
        --threads 2 --certfile server.crt --keyfile server.key
"""

# ruff: noqa: E402 - the repository root goes on sys.path before the project imports.
from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import argparse
from collections.abc import Sequence
from typing import Any

import uvicorn
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

from bench.baselines.common import ServedModel, load_models, tensors_from_body


class InferInput(BaseModel):
    """One input tensor, v2-shaped."""

    name: str
    shape: list[int]
    datatype: str
    data: list[Any]


class InferBody(BaseModel):
    """The request body."""

    inputs: list[InferInput]


def create_app(models: dict[str, ServedModel]) -> FastAPI:
    """The app: ``GET /health`` and ``POST /v2/models/{name}/infer``."""
    app = FastAPI(title="plain FastAPI baseline")

    @app.get("/health")
    def health() -> dict[str, bool]:
        return {"ok": True}

    @app.post("/v2/models/{name}/infer")
    def infer(name: str, body: InferBody) -> dict[str, Any]:
        model = models.get(name)
        if model is None:
            raise HTTPException(404, f"no model {name!r}")
        try:
            tensors = tensors_from_body(body.model_dump())
        except (ValueError, KeyError) as error:
            raise HTTPException(400, str(error)) from None
        return model.answer(model.forward(tensors))

    return app


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    parser = argparse.ArgumentParser(description="plain FastAPI baseline server")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--digits-state", type=Path, help="state dict of the digits CNN")
    parser.add_argument("--minilm", action="store_true", help="serve all-MiniLM-L6-v2")
    parser.add_argument("--certfile", type=Path, help="serve HTTPS with this certificate")
    parser.add_argument("--keyfile", type=Path)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Load the models and serve until SIGTERM."""
    args = parse_args(argv)
    models = load_models(args.digits_state, args.minilm, args.threads)
    tls: dict[str, Any] = {}
    if args.certfile is not None:
        tls = {"ssl_certfile": str(args.certfile), "ssl_keyfile": str(args.keyfile)}
    uvicorn.run(
        create_app(models),
        host=args.host,
        port=args.port,
        log_level="warning",
        access_log=False,
        **tls,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
