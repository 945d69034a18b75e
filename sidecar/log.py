"""Logging set-up: structlog, JSON lines by default, a readable console format for people.

Secrets never reach a log event: the request path logs certificate serial, fingerprint and
subject, never the certificate, a key or the ``X-USERINFO`` value.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def configure(fmt: str = "json", level: str = "info") -> None:
    """Configure structlog (and the stdlib loggers aiohttp uses) once per process."""
    renderer: Any
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    else:
        renderer = structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    # aiohttp logs through the stdlib: keep its noise at warning and route it to stderr.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(message)s")
    logging.getLogger("aiohttp.access").setLevel(logging.CRITICAL)


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
