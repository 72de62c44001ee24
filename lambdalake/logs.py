"""Structured logs: one ``event key=value ...`` line per fact, on stderr.

``LAMBDALAKE_LOG_FORMAT=json`` switches to JSON lines (for log shippers);
``LAMBDALAKE_LOG_LEVEL`` sets the level (default INFO). Standard output is kept
for the commands' results (the JSON summary lines scripts rely on).

>>> log = get_logger("ingest")
>>> log.info("ingest.batch", topic="orders", written=50000)  # doctest: +SKIP
2026-11-23T16:40:00Z [info] ingest.batch  topic=orders written=50000
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import structlog

_configured = False


def configure(level: str | None = None, fmt: str | None = None) -> None:
    global _configured
    level = (level or os.environ.get("LAMBDALAKE_LOG_LEVEL", "INFO")).upper()
    fmt = fmt or os.environ.get("LAMBDALAKE_LOG_FORMAT", "console")
    renderer: Any
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=False, pad_event=0)
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    _configured = True


def get_logger(name: str) -> Any:
    if not _configured:
        configure()
    return structlog.get_logger(name)
