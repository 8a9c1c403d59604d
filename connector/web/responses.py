"""JSON replies shared by every route."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from aiohttp import web

from connector.rules import safe_json


def _default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=lambda d: json.dumps(d, default=_default))


def json_error(status: int, message: str, **extra: Any) -> web.Response:
    return json_response({"error": message, **extra}, status=status)


async def read_json(request: web.Request) -> Any:
    """The body as JSON (see :func:`connector.rules.safe_json.loads`); raises ``web.HTTPBadRequest``
    with a JSON error when it is not, or is JSON the service does not accept."""
    try:
        return safe_json.loads(await request.read())
    except safe_json.UnsafeJSON as exc:
        raise web.HTTPBadRequest(
            text=json.dumps({"error": str(exc)}), content_type="application/json"
        ) from exc
