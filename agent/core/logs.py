"""Logging set-up: structlog, JSON lines in production, readable lines on a terminal.

Context that belongs to a piece of work (the domain being handled, a job id) is bound
with :func:`domain_context`, which uses structlog's contextvars: every log line written
inside the ``with`` block, in this task or in tasks it starts, carries ``domain`` and
``domain_uuid`` without passing a logger around.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import structlog

LogFormat = Literal["auto", "json", "console"]


def configure_logging(level: str = "info", fmt: LogFormat = "auto") -> None:
    """Configure structlog (and stdlib logging, for libraries) to write to stderr."""
    numeric = logging.getLevelNamesMapping()[level.upper()]
    use_console = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
    renderer: structlog.typing.Processor
    if use_console:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    else:
        renderer = structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )
    # libvirtaio and aiohttp log through the standard library; keep their warnings.
    logging.basicConfig(level=max(numeric, logging.WARNING), stream=sys.stderr)


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    """A logger whose lines name the component that wrote them."""
    logger: structlog.stdlib.BoundLogger = structlog.get_logger(component=name)
    return logger


@contextmanager
def domain_context(name: str, uuid: str) -> Iterator[None]:
    """Bind the domain's name and UUID to every log line written inside the block."""
    with structlog.contextvars.bound_contextvars(domain=name, domain_uuid=uuid):
        yield
