"""The settings page (``/admin``): server-rendered, behind a login, usable without JavaScript."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import aiohttp_jinja2
import jinja2
from aiohttp import web

from connector.runtime import Runtime
from connector.web.admin import views
from connector.web.auth import Auth
from connector.web.responses import json_error
from connector.web.security import SESSION_PATHS, AdminSessions, cross_site_refusal

HERE = Path(__file__).parent
STATIC_PREFIX = "/static/admin"
# What the page's middlewares look at; every other path skips them.
PAGE_PATHS = (f"{STATIC_PREFIX}/", *SESSION_PATHS)


def when(value: datetime | str) -> str:
    """A stored time as the page shows it: ``2024-05-01 12:30:05 UTC``."""
    moment = datetime.fromisoformat(value) if isinstance(value, str) else value
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _same_origin(public_url: str):
    @web.middleware
    async def same_origin(request: web.Request, handler) -> web.StreamResponse:
        """Refuse cross-site changes before anything is read, whatever the credentials: a
        browser sends cached HTTP Basic credentials and the session cookie alike
        (``SameSite=Lax`` still lets a top-level cross-site form post through in some
        browsers)."""
        reason = cross_site_refusal(request, public_url)
        if reason is None:
            return await handler(request)
        if request.path.startswith("/api/"):
            return json_error(403, reason)
        context = {"title": "Cross-site request refused", "message": reason}
        return aiohttp_jinja2.render_template("refused.html", request, context, status=403)

    return same_origin


@web.middleware
async def static_not_found(request: web.Request, handler) -> web.StreamResponse:
    """A static path the file system cannot even look up (a name too long, too deep) is a
    missing file, not a server error: aiohttp's static handler lets that ``OSError`` through."""
    if not request.path.startswith(f"{STATIC_PREFIX}/"):
        return await handler(request)
    try:
        return await handler(request)
    except OSError as exc:
        raise web.HTTPNotFound() from exc


def _page_middleware(public_url: str, sessions: AdminSessions):
    """:func:`static_not_found`, the same-origin check and the session, in that order, as one
    layer that only the page's, the admin API's and the static files' paths enter: every other
    request (each webhook among them) passes with one prefix check instead of three layers."""
    same_origin = _same_origin(public_url)

    @web.middleware
    async def page(request: web.Request, handler) -> web.StreamResponse:
        if not request.path.startswith(PAGE_PATHS):
            return await handler(request)

        async def with_session(request: web.Request) -> web.StreamResponse:
            return await sessions.middleware(request, handler)

        async def with_origin(request: web.Request) -> web.StreamResponse:
            return await same_origin(request, with_session)

        return await static_not_found(request, with_origin)

    return page


async def _page_headers(request: web.Request, response: web.StreamResponse) -> None:
    if not request.path.startswith("/admin"):
        return
    # The page shows the webhook URL's token and takes the password: never cache or frame it.
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "same-origin"
    response.headers["Content-Security-Policy"] = (
        "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; form-action 'self'"
    )


def setup_admin(app: web.Application, runtime: Runtime, auth: Auth) -> None:
    """Routes, templates (autoescaped), the same-origin and session middlewares of the page and
    the admin API (whose HTTP Basic shares the login form's throttle, in ``auth``)."""
    env = aiohttp_jinja2.setup(
        app,
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters["when"] = when
    public_url = runtime.config.server.public_url
    sessions = AdminSessions(
        runtime.secrets, runtime.sessionmaker, secure=public_url.startswith("https://")
    )
    app[aiohttp_jinja2.static_root_key] = STATIC_PREFIX
    app.middlewares.append(_page_middleware(public_url, sessions))
    app.on_response_prepare.append(_page_headers)
    app.router.add_static(STATIC_PREFIX, HERE / "static")
    views.setup_routes(app, runtime, auth, sessions)
