"""Who may call what: the platform's bearer token, the admin's HTTP Basic credentials or the
settings page's session."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Awaitable, Callable

from aiohttp import web

from connector.ops.audit import AuditAction, AuditLog
from connector.settings.secrets import ServiceSecrets
from connector.web.responses import json_error
from connector.web.security import (
    CSRF_HEADER,
    SAFE_METHODS,
    LoginThrottle,
    admin_session,
    client_address,
    csrf_valid,
    same_secret,
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ADMIN_USER = "admin"


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


def _credentials_required() -> web.Response:
    response = json_error(401, "admin credentials required")
    response.headers["WWW-Authenticate"] = 'Basic realm="connector"'
    return response


class Auth:
    """The checks routes are wrapped in: :meth:`admin` for the admin API, :meth:`ingest` for
    the platform's endpoints. The settings page's login form checks :meth:`password_ok` and
    counts in the same :class:`LoginThrottle`. Wrong admin passwords go to the audit log."""

    def __init__(
        self,
        admin_password: str,
        secrets: ServiceSecrets,
        throttle: LoginThrottle,
        audit: AuditLog,
    ):
        self._admin_password = admin_password
        self._secrets = secrets
        self.throttle = throttle
        self.audit = audit

    def password_ok(self, password: str) -> bool:
        return same_secret(password, self._admin_password)

    def _is_admin(self, credentials: tuple[str, str]) -> bool:
        user, password = credentials
        return same_secret(user, ADMIN_USER) & self.password_ok(password)

    def admin(self, handler: Handler) -> Handler:
        """HTTP Basic for scripts, or the settings page's session; through the session a call
        that changes something must carry the page's CSRF token in ``X-CSRF-Token``.

        A request with Basic credentials is judged by them alone, and counts in the login
        form's throttle: after too many wrong passwords from its address it gets ``429`` with
        ``Retry-After``, even with the right one.
        """

        async def wrapped(request: web.Request) -> web.StreamResponse:
            credentials = basic_credentials(request)
            if credentials is not None:
                client = client_address(request)
                wait = self.throttle.retry_after(client)
                if wait:
                    await self.audit.record(
                        AuditAction.LOGIN_FAILED, {"via": "api", "reason": "throttled"}, client
                    )
                    response = json_error(
                        429, f"too many failed attempts; try again in {wait} seconds"
                    )
                    response.headers["Retry-After"] = str(wait)
                    return response
                if not self._is_admin(credentials):
                    self.throttle.failed(client)
                    await self.audit.record(
                        AuditAction.LOGIN_FAILED,
                        {"via": "api", "reason": "wrong credentials"},
                        client,
                    )
                    return _credentials_required()
                self.throttle.succeeded(client)
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

    def ingest(self, handler: Handler) -> Handler:
        """The platform's bearer token (``security.ingest_token``)."""

        async def wrapped(request: web.Request) -> web.StreamResponse:
            token = bearer_token(request)
            if token is None or not same_secret(token, self._secrets.ingest_token):
                return json_error(401, "missing or wrong ingest token")
            return await handler(request)

        return wrapped
