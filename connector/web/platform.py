"""``POST /smart-notifier`` and ``POST /batch``: platform notifications, stored before the reply."""

from __future__ import annotations

from aiohttp import web

from connector.notifications.parse import InvalidNotification, parse_notification
from connector.notifications.store import store_messages
from connector.web.auth import require_ingest_token
from connector.web.keys import metrics_key, scheduler_key, sessionmaker_key
from connector.web.responses import json_error, json_response, read_json

# Hull's own connectors answer this so the platform keeps sending at its normal pace.
FLOW_CONTROL = {"type": "next"}


async def _receive(request: web.Request, *, via_batch: bool) -> web.Response:
    route = "batch" if via_batch else "smart-notifier"
    metrics = request.app[metrics_key]
    body = await read_json(request)
    try:
        parsed = parse_notification(body)
    except InvalidNotification as exc:
        metrics.notifications.labels(route, "invalid").inc()
        return json_error(400, str(exc))
    result = await store_messages(
        request.app[sessionmaker_key], parsed.messages, via_batch=via_batch
    )
    metrics.notifications.labels(route, "stored").inc()
    if result.changed:
        request.app[scheduler_key].trigger_sync()
    return json_response(
        {
            "accepted": result.accepted,
            "rejected": sorted(parsed.rejected + result.rejected, key=lambda r: r["index"]),
            "flow_control": FLOW_CONTROL,
        }
    )


@require_ingest_token
async def smart_notifier(request: web.Request) -> web.Response:
    return await _receive(request, via_batch=False)


@require_ingest_token
async def batch(request: web.Request) -> web.Response:
    return await _receive(request, via_batch=True)


def setup_routes(app: web.Application) -> None:
    app.router.add_post("/smart-notifier", smart_notifier)
    app.router.add_post("/batch", batch)
