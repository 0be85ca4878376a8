"""The public tier's state and version: a leaf module that ``app``, ``deps`` and ``routes`` share.

It imports no module that imports it back, so ``app -> routes -> deps`` needs no deferred import.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from public_api.metrics import PublicMetrics
    from public_api.models import ModelSet
    from public_api.private_client import PrivateTierClient
    from public_api.protection import Protection
    from public_api.sealing import RequestSealer
    from public_api.service import InferenceService
    from public_api.settings import PublicSettings


def _installed_version() -> str:
    """The version in pyproject.toml, as installed; a source tree that is not installed: 0+unknown."""
    try:
        return version("splitvault")
    except PackageNotFoundError:
        return "0+unknown"


VERSION = _installed_version()


@dataclass
class PublicState:
    """What the routes need, built in the app's lifespan (nothing heavy at import)."""

    settings: PublicSettings
    service: InferenceService
    private: PrivateTierClient
    protection: Protection
    metrics: PublicMetrics
    models: ModelSet  # each model as both tiers hold it (public_api/models.py)
    sealer: RequestSealer | None = None  # None: bodies are not sealed (no owner key)
