"""The OpenAPI document as the tier really answers: FastAPI's, without its 422 responses.

Every validation error is turned into a 400 ``{"error": ...}`` (public_api/errors.py), so the
422 responses and validation-error schemas FastAPI adds on its own would document answers the
tier never gives; clients and schema-driven fuzzers would trust them.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

_UNUSED_SCHEMAS = ("HTTPValidationError", "ValidationError")


def install_openapi(app: FastAPI) -> None:
    """Make ``app.openapi()`` (served at ``/openapi.json``) return the corrected document."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = get_openapi(
                title=app.title,
                version=app.version,
                summary=app.summary,
                description=app.description,
                routes=app.routes,
            )
            app.openapi_schema = without_422(document)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def without_422(document: dict[str, Any]) -> dict[str, Any]:
    """``document`` without 422 responses and the schemas only they used."""
    for operations in document.get("paths", {}).values():
        for operation in operations.values():
            operation.get("responses", {}).pop("422", None)
    schemas = document.get("components", {}).get("schemas", {})
    for name in _UNUSED_SCHEMAS:
        schemas.pop(name, None)
    return document
