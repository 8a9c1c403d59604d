"""Who may call what: the platform's bearer token and the admin's HTTP Basic credentials."""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Awaitable, Callable

from aiohttp import web

from connector.appkeys import config_key, secrets_key
from connector.responses import json_error

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


def is_admin(request: web.Request) -> bool:
    credentials = basic_credentials(request)
    if credentials is None:
        return False
    user, password = credentials
    expected = request.app[config_key].security.admin_password
    return _same(user, ADMIN_USER) & _same(password, expected)


def require_admin(handler: Handler) -> Handler:
    async def wrapped(request: web.Request) -> web.StreamResponse:
        if not is_admin(request):
            response = json_error(401, "admin credentials required")
            response.headers["WWW-Authenticate"] = 'Basic realm="connector"'
            return response
        return await handler(request)

    return wrapped


def require_ingest_token(handler: Handler) -> Handler:
    async def wrapped(request: web.Request) -> web.StreamResponse:
        token = bearer_token(request)
        if token is None or not _same(token, request.app[secrets_key].ingest_token):
            return json_error(401, "missing or wrong ingest token")
        return await handler(request)

    return wrapped
