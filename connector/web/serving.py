"""Serving the app: ``POST /webhook`` in a lane of its own, everything else through the app.

aiohttp's :class:`~aiohttp.web.Application` resolves each request's route and runs it through
the app's middleware chain (:mod:`connector.web.errors`, the page's layer, and the layer aiohttp
adds whenever there is middleware). A webhook needs none of it: the receiver answers every
outcome itself. Under a burst those layers and the route lookup were about a tenth of the
receiving process's CPU, so the server that :class:`ServiceRunner` makes hands a webhook straight
to the receiver and every other request to the app, which still holds the route (``GET
/webhook`` gets its 405 there, and a server made by a plain runner serves webhooks that way).
What the edge middleware does for the other routes, the lane does for webhooks: an unexpected
error is logged and answered ``500 {"error": "internal error"}``.

:func:`serve` runs the app on a listening socket until SIGTERM or SIGINT, as
:func:`aiohttp.web.run_app` does (which cannot take a runner of its own), on uvloop's event loop
where it is installed (:func:`new_event_loop`), with an access log (when ``server.access_log``
is on) that leaves the webhook URL's token out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable

try:
    import uvloop
except ImportError:  # not on Windows, or left out of the environment: asyncio's own loop
    uvloop = None

from aiohttp import web
from aiohttp.web_log import AccessLogger

from connector.web.errors import unexpected_error
from connector.web.webhook import WEBHOOK_PATH, webhook_receiver_key

# As aiohttp's run_app: how long a graceful stop waits for requests under way, and how long
# an idle keep-alive connection is kept.
SHUTDOWN_TIMEOUT_SECONDS = 60.0
KEEPALIVE_TIMEOUT_SECONDS = 75.0

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


def webhook_lane(app_handler: Handler, receive: Handler) -> Handler:
    """The server's request handler: ``POST /webhook`` to ``receive``, the rest to the app."""

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        if request.method != "POST" or request.path != WEBHOOK_PATH:
            return await app_handler(request)
        try:
            return await receive(request)
        except Exception:
            return unexpected_error(WEBHOOK_PATH)

    return handle


# What the access log shows for the webhook URL's token.
REDACTED = "redacted"


class RedactingAccessLogger(AccessLogger):
    """aiohttp's access log line, with the ``conf`` query value (the webhook URL's token,
    which lets anyone post webhooks) replaced by :data:`REDACTED`."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        if request is not None and "conf" in request.query:
            request = request.clone(rel_url=request.rel_url.update_query(conf=REDACTED))
        super().log(request, response, time)


class ServiceRunner(web.AppRunner):
    """An :class:`~aiohttp.web.AppRunner` whose server has the webhook lane."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        receiver = self.app.get(webhook_receiver_key)
        if receiver is not None:
            server.request_handler = webhook_lane(server.request_handler, receiver.receive)
        return server


def event_loop_name() -> str:
    """The event loop :func:`new_event_loop` makes: ``uvloop`` or ``asyncio``."""
    return "asyncio" if uvloop is None else "uvloop"


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's event loop where it is installed, else asyncio's.

    The loop's own work (callbacks, futures, sockets, the driver threads' wake-ups) is a large
    part of a webhook's cost: on uvloop the connector took 30 % more webhooks a second, the bare
    aiohttp handler 15 % more (bench/inbound.py)."""
    return asyncio.new_event_loop() if uvloop is None else uvloop.new_event_loop()


def serve(app: web.Application, sock: socket.socket, *, access_log: logging.Logger | None) -> None:
    """Serve ``app`` on ``sock`` until SIGTERM or SIGINT, then stop gracefully. What the app's
    start raises (a database not migrated, say) is raised here."""
    loop = new_event_loop()
    main = loop.create_task(_serve(app, sock, access_log))
    try:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(main)
    except (web.GracefulExit, KeyboardInterrupt):
        pass
    finally:
        try:
            if not main.done():
                main.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    loop.run_until_complete(main)
        finally:
            _cancel_remaining(loop)
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
            asyncio.set_event_loop(None)


async def _serve(app: web.Application, sock: socket.socket, access_log) -> None:
    runner = ServiceRunner(
        app,
        handle_signals=True,
        access_log=access_log,
        access_log_class=RedactingAccessLogger,
        shutdown_timeout=SHUTDOWN_TIMEOUT_SECONDS,
        keepalive_timeout=KEEPALIVE_TIMEOUT_SECONDS,
    )
    await runner.setup()
    try:
        await web.SockSite(runner, sock).start()
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def _cancel_remaining(loop: asyncio.AbstractEventLoop) -> None:
    tasks = [task for task in asyncio.all_tasks(loop) if not task.done()]
    for task in tasks:
        task.cancel()
    if tasks:
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
