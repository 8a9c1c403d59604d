"""``POST /smart-notifier`` and ``POST /batch``: platform notifications, stored before the reply."""

from __future__ import annotations

from aiohttp import web

from connector.notifications.parse import InvalidNotification, parse_notification
from connector.notifications.store import store_messages
from connector.runtime import Runtime
from connector.web.auth import Auth
from connector.web.responses import json_error, json_response, read_json

# Hull's own connectors answer this so the platform keeps sending at its normal pace.
FLOW_CONTROL = {"type": "next"}


class PlatformReceiver:
    def __init__(self, runtime: Runtime):
        self._sessionmaker = runtime.sessionmaker
        self._scheduler = runtime.scheduler
        self._metrics = runtime.metrics

    async def smart_notifier(self, request: web.Request) -> web.Response:
        return await self._receive(request, via_batch=False)

    async def batch(self, request: web.Request) -> web.Response:
        return await self._receive(request, via_batch=True)

    async def _receive(self, request: web.Request, *, via_batch: bool) -> web.Response:
        route = "batch" if via_batch else "smart-notifier"
        body = await read_json(request)
        try:
            parsed = parse_notification(body)
        except InvalidNotification as exc:
            self._metrics.notifications.labels(route, "invalid").inc()
            return json_error(400, str(exc))
        result = await store_messages(self._sessionmaker, parsed.messages, via_batch=via_batch)
        self._metrics.notifications.labels(route, "stored").inc()
        if result.changed:
            self._scheduler.trigger_sync("notification")
        return json_response(
            {
                "accepted": result.accepted,
                "rejected": sorted(parsed.rejected + result.rejected, key=lambda r: r["index"]),
                "flow_control": FLOW_CONTROL,
            }
        )


def setup_platform(app: web.Application, runtime: Runtime, auth: Auth) -> None:
    receiver = PlatformReceiver(runtime)
    app.router.add_post("/smart-notifier", auth.ingest(receiver.smart_notifier))
    app.router.add_post("/batch", auth.ingest(receiver.batch))
