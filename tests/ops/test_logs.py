"""Structured logs: one JSON object a line, timestamps in ISO 8601 UTC."""

from __future__ import annotations

import json
import logging
import re
from datetime import UTC, datetime

import pytest

from connector.ops.logs import setup_logging


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_logs_time_is_iso_8601_utc(capsys, restore_logging):
    setup_logging()
    logging.getLogger("connector.test").warning("hello", extra={"users": 3})
    line = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["time"]), line["time"]
    logged = datetime.fromisoformat(line["time"])
    assert logged.tzinfo == UTC
    assert abs((datetime.now(UTC) - logged).total_seconds()) < 60
    assert (line["level"], line["logger"], line["message"], line["users"]) == (
        "WARNING",
        "connector.test",
        "hello",
        3,
    )
