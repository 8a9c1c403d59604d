"""The web application: ``create_app(config)`` wires the database, the sync and the scheduler."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from aiohttp import web

from connector.config import Config
from connector.inbound.inbox import InboxWriter
from connector.ops.metrics import Metrics
from connector.outbound.credential_check import CredentialChecker
from connector.outbound.service import SenderFactory
from connector.rules.safe_json import is_storable
from connector.runtime import open_runtime
from connector.scheduler import Scheduler
from connector.web import api, health, platform, webhook
from connector.web.admin import setup_admin
from connector.web.keys import (
    config_key,
    credential_checker_key,
    credentials_key,
    engine_key,
    forwarding_key,
    inbound_processor_key,
    inbox_key,
    kv_key,
    metrics_key,
    scheduler_key,
    secrets_key,
    sessionmaker_key,
    settings_key,
    sync_key,
    webhook_gate_key,
)
from connector.web.responses import json_error

log = logging.getLogger("connector.web.app")

# Platform notifications carry up to a few thousand users; Hull's own limit is 10 MiB.
MAX_NOTIFICATION_BYTES = 10 * 1024 * 1024


def _runtime_context(config: Config, sender_factory: SenderFactory | None):
    async def runtime(app: web.Application) -> AsyncIterator[None]:
        async with open_runtime(
            config, metrics=app[metrics_key], sender_factory=sender_factory
        ) as rt:
            app[engine_key] = rt.engine
            app[sessionmaker_key] = rt.sessionmaker
            app[kv_key] = rt.kv
            app[settings_key] = rt.settings
            app[credentials_key] = rt.credentials
            app[credential_checker_key] = CredentialChecker(config, rt.settings, rt.credentials)
            app[secrets_key] = rt.secrets
            app[sync_key] = rt.sync
            app[webhook_gate_key] = rt.gate
            app[inbound_processor_key] = rt.processor
            app[forwarding_key] = rt.forwarding
            inbox = InboxWriter(rt.sessionmaker)
            app[inbox_key] = inbox
            inbox.start()
            rt.processor.start()
            # Deliveries stored before a restart are processed without waiting for the sweep.
            rt.processor.wake()
            try:
                yield
            finally:
                await inbox.close()
                await rt.processor.close()

    return runtime


async def _scheduler_context(app: web.Application) -> AsyncIterator[None]:
    scheduler = Scheduler(
        app[sync_key],
        app[inbound_processor_key],
        app[sessionmaker_key],
        app[config_key],
        credential_check=app[credential_checker_key].check_stored,
        forwarding=app[forwarding_key],
    )
    app[scheduler_key] = scheduler
    scheduler.start()
    yield
    await scheduler.shutdown()


@web.middleware
async def json_errors(request: web.Request, handler):
    """Every error is JSON ``{"error": ...}``; an unexpected one is logged and answered 500."""
    try:
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
        log.exception("unhandled error", extra={"path": request.path})
        return json_error(500, "internal error")


@web.middleware
async def storable_urls(request: web.Request, handler):
    """A path or query holding NUL (``%00``) is refused before any handler can pass it to the
    database (PostgreSQL refuses NUL in text, which would be a 500)."""
    if not is_storable(request.path) or not all(
        is_storable(key) and is_storable(value) for key, value in request.query.items()
    ):
        return json_error(400, "the URL holds a NUL character")
    return await handler(request)


def create_app(config: Config, *, sender_factory: SenderFactory | None = None) -> web.Application:
    """The service; ``sender_factory`` replaces how Track API calls are made (dry runs)."""
    app = web.Application(
        middlewares=[json_errors, storable_urls], client_max_size=MAX_NOTIFICATION_BYTES
    )
    app[config_key] = config
    app[metrics_key] = Metrics()
    app.cleanup_ctx.append(_runtime_context(config, sender_factory))
    app.cleanup_ctx.append(_scheduler_context)
    health.setup_routes(app)
    platform.setup_routes(app)
    webhook.setup_routes(app)
    api.setup_routes(app)
    setup_admin(app)
    return app
