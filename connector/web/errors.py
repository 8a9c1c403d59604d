"""The middleware that shapes every answer: errors as JSON, URLs the database could not take."""

from __future__ import annotations

import logging

from aiohttp import web

from connector.rules.safe_json import is_storable
from connector.web.responses import json_error

log = logging.getLogger("connector.web")


@web.middleware
async def edge(request: web.Request, handler):
    """Every error is JSON ``{"error": ...}``; an unexpected one is logged and answered 500.
    A path or query holding NUL (``%00``) is refused before any handler can pass it to the
    database (PostgreSQL refuses NUL in text, which would be a 500).

    One middleware, not two: every request, each webhook among them, pays for each layer."""
    try:
        if not _storable_url(request):
            return json_error(400, "the URL holds a NUL character")
        return await handler(request)
    except web.HTTPException as exc:
        if exc.content_type == "application/json" or exc.status < 400:
            raise
        response = json_error(exc.status, exc.reason)
        # A 405 must say which methods the route takes (RFC 9110 §15.5.6).
        if "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    except Exception:
        return unexpected_error(request.path)


def unexpected_error(path: str) -> web.Response:
    """The answer to an error no handler expected (the caller is in its ``except``): logged
    with its traceback, answered ``500 {"error": "internal error"}``."""
    log.exception("unhandled error", extra={"path": path})
    return json_error(500, "internal error")


def _storable_url(request: web.Request) -> bool:
    return is_storable(request.path) and all(
        is_storable(key) and is_storable(value) for key, value in request.query.items()
    )


def setup_errors(app: web.Application) -> None:
    app.middlewares.append(edge)
