"""structlog set-up: key=value lines on stderr, with a run id bound to every line."""

from __future__ import annotations

import logging
import sys
import uuid

import structlog


def configure_logging(debug: bool = False) -> str:
    """Configure structlog once per process; return the run id bound to every line."""
    level = logging.DEBUG if debug else logging.INFO
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.dev.ConsoleRenderer(colors=False),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        # Resolve sys.stderr per logger, not once: it may be replaced (pytest, redirects).
        logger_factory=lambda *args: structlog.PrintLogger(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    run_id = uuid.uuid4().hex[:8]
    structlog.contextvars.bind_contextvars(run_id=run_id)
    return run_id
