"""The web application: ``create_app(config)`` is the runtime's services behind routes.

The app is a sequence of ``setup_*`` calls, each registering the routes of one part with the
collaborators it needs; the runtime (:mod:`connector.runtime`) is opened, and its background
work run, for as long as the app is.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from connector.config import Config
from connector.outbound.service import SenderFactory
from connector.runtime import Runtime, build_runtime
from connector.web.admin import setup_admin
from connector.web.api import setup_api
from connector.web.auth import Auth
from connector.web.errors import setup_errors
from connector.web.health import setup_health
from connector.web.keys import runtime_key
from connector.web.openapi import setup_openapi
from connector.web.platform import setup_platform
from connector.web.security import LoginThrottle
from connector.web.webhook import setup_webhook

# Platform notifications carry up to a few thousand users; Hull's own limit is 10 MiB.
MAX_NOTIFICATION_BYTES = 10 * 1024 * 1024


def _running(runtime: Runtime, scheduled_jobs: bool):
    async def run(app: web.Application) -> AsyncIterator[None]:
        async with runtime.opened(), runtime.serving(scheduled_jobs=scheduled_jobs):
            yield

    return run


def create_app(
    config: Config,
    *,
    sender_factory: SenderFactory | None = None,
    scheduled_jobs: bool = True,
) -> web.Application:
    """The service; ``sender_factory`` replaces how Track API calls are made (dry runs);
    ``scheduled_jobs`` off leaves the scheduler's jobs to another worker of the same port."""
    runtime = build_runtime(config, sender_factory=sender_factory)
    app = web.Application(client_max_size=MAX_NOTIFICATION_BYTES)
    app[runtime_key] = runtime
    app.cleanup_ctx.append(_running(runtime, scheduled_jobs))
    auth = Auth(config.security.admin_password, runtime.secrets, LoginThrottle(), runtime.audit)
    setup_errors(app)
    setup_health(app, runtime)
    setup_platform(app, runtime, auth)
    setup_webhook(app, runtime)
    setup_api(app, runtime, auth)
    setup_openapi(app)
    setup_admin(app, runtime, auth)
    return app
