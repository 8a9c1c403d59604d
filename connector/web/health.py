"""Unauthenticated probes: liveness, readiness, status and Prometheus metrics."""

from __future__ import annotations

from aiohttp import web
from sqlalchemy import func, select, text

from connector.db.models import ForwardMessage, User, WebhookDelivery
from connector.ops.metrics import CONTENT_TYPE, STATUS_LEVELS
from connector.ops.stats import service_status
from connector.runtime import Runtime
from connector.web.responses import json_error, json_response


class Probes:
    def __init__(self, runtime: Runtime):
        self._engine = runtime.engine
        self._sessionmaker = runtime.sessionmaker
        self._settings = runtime.settings
        self._credentials = runtime.credentials
        self._metrics = runtime.metrics
        self._sync = runtime.sync

    async def healthz(self, request: web.Request) -> web.Response:
        return json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        try:
            async with self._engine.connect() as connection:
                await connection.execute(text("SELECT 1"))
        except Exception as exc:
            return json_error(503, f"database unreachable: {type(exc).__name__}")
        return json_response({"status": "ready"})

    async def status(self, request: web.Request) -> web.Response:
        current = await service_status(self._sessionmaker, self._settings, self._credentials)
        return json_response(current.as_dict())

    async def metrics(self, request: web.Request) -> web.Response:
        """The instance's counters, and gauges read from the database at each scrape: they
        cover every instance and ``connector sync`` processes, which serve no /metrics."""
        depth = self._metrics.queue_depth
        async with self._sessionmaker() as session:
            for queue, model, condition in (
                ("outbound_users", User, User.pending.is_(True)),
                ("inbound_deliveries", WebhookDelivery, WebhookDelivery.status == "pending"),
                ("forward_outbox", ForwardMessage, ForwardMessage.status == "pending"),
            ):
                count = await session.scalar(select(func.count(model.id)).where(condition))
                depth.labels(queue).set(count or 0)
        last_success = await self._sync.last_success_at()
        if last_success is not None:
            self._metrics.pass_finished(last_success, credentials_error=False)
        current = await service_status(self._sessionmaker, self._settings, self._credentials)
        self._metrics.status.set(STATUS_LEVELS[current.status])
        return web.Response(body=self._metrics.render(), headers={"Content-Type": CONTENT_TYPE})


def setup_health(app: web.Application, runtime: Runtime) -> None:
    probes = Probes(runtime)
    app.router.add_get("/healthz", probes.healthz)
    app.router.add_get("/readyz", probes.readyz)
    app.router.add_get("/status", probes.status)
    app.router.add_get("/metrics", probes.metrics)
