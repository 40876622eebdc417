"""structlog JSON logs: one line per event, context (request_id, site_id, job_id) bound per unit of work."""

from __future__ import annotations

import logging
import sys
from typing import Any

import orjson
import structlog


def _dumps(obj: Any, default: Any = None) -> str:
    return orjson.dumps(obj, default=default).decode()


def configure_logging(level: str = "info", stream: Any = None) -> None:
    """Route structlog and stdlib logging to JSON lines on stderr (or `stream`)."""
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        numeric = logging.INFO
    logging.basicConfig(level=numeric, stream=stream or sys.stderr, format="%(message)s", force=True)
    for noisy in ("aiormq", "aio_pika", "asyncio", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(max(numeric, logging.WARNING))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(serializer=_dumps),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stderr),
        cache_logger_on_first_use=True,
    )


def get_logger(name: str) -> Any:
    """A structlog logger carrying the component name."""
    # Initial values (not .bind) keep the logger lazy, so module-level loggers made at import time
    # still use the configuration `configure_logging` installs later.
    return structlog.get_logger(name, component=name)
