"""Who may call what: the platform's bearer token, the admin's HTTP Basic credentials or the
settings page's session."""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Awaitable, Callable

from aiohttp import web

from connector.web.admin.security import (
    CSRF_HEADER,
    SAFE_METHODS,
    admin_session,
    client_address,
    csrf_valid,
)
from connector.web.keys import config_key, login_throttle_key, secrets_key
from connector.web.responses import json_error

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ADMIN_USER = "admin"


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


def bearer_token(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def basic_credentials(request: web.Request) -> tuple[str, str] | None:
    header = request.headers.get("Authorization", "")
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user, _, password = base64.b64decode(encoded.strip()).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return user, password


def is_admin(request: web.Request, credentials: tuple[str, str]) -> bool:
    user, password = credentials
    expected = request.app[config_key].security.admin_password
    return _same(user, ADMIN_USER) & _same(password, expected)


def _credentials_required() -> web.Response:
    response = json_error(401, "admin credentials required")
    response.headers["WWW-Authenticate"] = 'Basic realm="connector"'
    return response


def require_admin(handler: Handler) -> Handler:
    """HTTP Basic for scripts, or the settings page's session; through the session a call
    that changes something must carry the page's CSRF token in ``X-CSRF-Token``.

    A request with Basic credentials is judged by them alone, and counts in the login form's
    throttle: after too many wrong passwords from its address it gets ``429`` with
    ``Retry-After``, even with the right one.
    """

    async def wrapped(request: web.Request) -> web.StreamResponse:
        credentials = basic_credentials(request)
        if credentials is not None:
            throttle = request.app[login_throttle_key]
            client = client_address(request)
            wait = throttle.retry_after(client)
            if wait:
                response = json_error(429, f"too many failed attempts; try again in {wait} seconds")
                response.headers["Retry-After"] = str(wait)
                return response
            if not is_admin(request, credentials):
                throttle.failed(client)
                return _credentials_required()
            throttle.succeeded(client)
            return await handler(request)
        session = admin_session(request)
        if session is None:
            return _credentials_required()
        if request.method not in SAFE_METHODS and not csrf_valid(
            session, request.headers.get(CSRF_HEADER)
        ):
            return json_error(403, f"missing or wrong {CSRF_HEADER} header")
        return await handler(request)

    return wrapped


def require_ingest_token(handler: Handler) -> Handler:
    async def wrapped(request: web.Request) -> web.StreamResponse:
        token = bearer_token(request)
        if token is None or not _same(token, request.app[secrets_key].ingest_token):
            return json_error(401, "missing or wrong ingest token")
        return await handler(request)

    return wrapped
