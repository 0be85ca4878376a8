"""Structured logs: one JSON object per line on stderr, never key material."""

from __future__ import annotations

import logging
import sys

import structlog
from structlog.tracebacks import ExceptionDictTransformer


def configure_logging(level: str = "INFO", *, tier: str) -> None:
    """Send structlog and stdlib logs as JSON lines to stderr, tagged with the tier."""
    logging.basicConfig(format="%(message)s", stream=sys.stderr, level=level.upper(), force=True)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            # No local variables in tracebacks: they may hold keys, tokens or weights.
            structlog.processors.ExceptionRenderer(ExceptionDictTransformer(show_locals=False)),
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        # One write per line (print makes two), so that no other writer to the stream, such as
        # gRPC core tracing, lands between a JSON line and its newline.
        logger_factory=structlog.WriteLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )
    structlog.contextvars.bind_contextvars(tier=tier)


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    """A structured logger for ``name``."""
    return structlog.get_logger(name)  # type: ignore[no-any-return]
