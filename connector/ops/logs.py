"""Structured logs: one JSON object a line, with the fields given in ``extra``."""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime

from pythonjsonlogger.json import JsonFormatter

ACCESS_LOGGER = "aiohttp.access"
"""aiohttp's access log; ``serve`` passes it on when ``server.access_log`` is on."""


class _UTCJsonFormatter(JsonFormatter):
    """Times in ISO 8601 UTC with milliseconds (``2024-05-01T12:00:00.123Z``), whatever the
    host's time zone, so that lines of several instances sort and compare."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        moment = datetime.fromtimestamp(record.created, UTC)
        return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def setup_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        _UTCJsonFormatter(
            # The process id tells the workers of `serve --workers N` apart.
            "%(asctime)s %(levelname)s %(name)s %(process)d %(message)s",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # APScheduler logs every job run at INFO; the sync logs its own summary.
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
