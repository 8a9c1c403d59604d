"""Unauthenticated probes: liveness, readiness, status and Prometheus metrics."""

from __future__ import annotations

from aiohttp import web
from sqlalchemy import func, select, text

from connector.db.models import User
from connector.ops.metrics import CONTENT_TYPE
from connector.ops.stats import service_status
from connector.web.keys import (
    credentials_key,
    engine_key,
    metrics_key,
    sessionmaker_key,
    settings_key,
)
from connector.web.responses import json_error, json_response


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    try:
        async with request.app[engine_key].connect() as connection:
            await connection.execute(text("SELECT 1"))
    except Exception as exc:
        return json_error(503, f"database unreachable: {type(exc).__name__}")
    return json_response({"status": "ready"})


async def status(request: web.Request) -> web.Response:
    current = await service_status(
        request.app[sessionmaker_key], request.app[settings_key], request.app[credentials_key]
    )
    return json_response(current.as_dict())


async def metrics(request: web.Request) -> web.Response:
    async with request.app[sessionmaker_key]() as session:
        pending = await session.scalar(select(func.count()).where(User.pending.is_(True)))
    registry = request.app[metrics_key]
    registry.queue_depth.labels("outbound_users").set(pending or 0)
    return web.Response(body=registry.render(), headers={"Content-Type": CONTENT_TYPE})


def setup_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/status", status)
    app.router.add_get("/metrics", metrics)
