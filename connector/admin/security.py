"""Who is logged in to the settings page: the session cookie, CSRF tokens, login throttling.

The session is a small JSON document in a cookie signed with ``security.secret_key``
(itsdangerous' timestamped HMAC signature): nothing is kept on the server, so every instance
sharing the secret key accepts it, and a changed secret key logs everybody out. It holds only
the "logged in" flag and the CSRF token; the cookie is ``HttpOnly``, ``SameSite=Lax``,
``Secure`` when the public URL is https, and refused after :data:`SESSION_MAX_AGE_SECONDS`.
"""

from __future__ import annotations

import hmac
import math
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

from aiohttp import web
from itsdangerous import BadSignature, URLSafeTimedSerializer

from connector.appkeys import admin_sessions_key, config_key

SESSION_COOKIE = "connector_session"
# A working day: an operator setting the connector up is not logged out half-way.
SESSION_MAX_AGE_SECONDS = 12 * 3600
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# Paths that read the session; the platform's and Customer.io's endpoints never do.
SESSION_PATHS = ("/admin", "/api/")
# Separates this signature from any other use of the secret key.
_SALT = "connector.admin.session"

# Five wrong passwords from one address in 15 minutes, then that address waits: slow enough to
# make guessing hopeless, lenient enough for a few typos.
MAX_LOGIN_FAILURES = 5
LOGIN_WINDOW_SECONDS = 15 * 60
# Bounds the throttle's memory when many addresses try; the oldest are forgotten first.
MAX_TRACKED_CLIENTS = 10_000

_ADMIN = "admin"
_CSRF = "csrf"


class Session(dict[str, Any]):
    """The session's data; the response carries a new cookie when it ``changed``."""

    def __init__(self, data: dict[str, Any] | None = None):
        super().__init__(data or {})
        self.changed = False

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, value)
        self.changed = True

    def pop(self, key: str, default: Any = None) -> Any:
        if key in self:
            self.changed = True
        return super().pop(key, default)

    def invalidate(self) -> None:
        self.clear()
        self.changed = True


_session_key = web.RequestKey("admin_session", Session)


class AdminSessions:
    """Reads and writes the session cookie, signed under the secret key."""

    def __init__(self, secret_key: str, *, secure: bool):
        self._serializer = URLSafeTimedSerializer(secret_key, salt=_SALT)
        self._secure = secure

    def load(self, request: web.Request) -> Session:
        cookie = request.cookies.get(SESSION_COOKIE)
        if not cookie:
            return Session()
        try:
            data = self._serializer.loads(cookie, max_age=SESSION_MAX_AGE_SECONDS)
        except BadSignature:
            return Session()
        return Session(data if isinstance(data, dict) else None)

    def save(self, response: web.StreamResponse, session: Session) -> None:
        if not session:
            response.del_cookie(SESSION_COOKIE, path="/", secure=self._secure, samesite="Lax")
            return
        response.set_cookie(
            SESSION_COOKIE,
            self._serializer.dumps(dict(session)),
            path="/",
            max_age=SESSION_MAX_AGE_SECONDS,
            httponly=True,
            samesite="Lax",
            secure=self._secure,
        )


@web.middleware
async def sessions(request: web.Request, handler) -> web.StreamResponse:
    """Loads the session for the page and the admin API; sends it back when it changed."""
    if not request.path.startswith(SESSION_PATHS):
        return await handler(request)
    store = request.app[admin_sessions_key]
    session = request[_session_key] = store.load(request)
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        # Redirects are raised; they carry the cookie as well.
        if session.changed:
            store.save(exc, session)
        raise
    if session.changed:
        store.save(response, session)
    return response


def get_session(request: web.Request) -> Session:
    return request[_session_key]


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


def password_ok(request: web.Request, password: str) -> bool:
    return _same(password, request.app[config_key].security.admin_password)


def admin_session(request: web.Request) -> Session | None:
    """The session of a logged-in admin, or None."""
    session = get_session(request)
    return session if session.get(_ADMIN) is True else None


def csrf_token(session: Session) -> str:
    """The session's CSRF token, made on first use."""
    token = session.get(_CSRF)
    if not isinstance(token, str):
        token = secrets.token_urlsafe(32)
        session[_CSRF] = token
    return token


def csrf_valid(session: Session, given: str | None) -> bool:
    expected = session.get(_CSRF)
    if not isinstance(expected, str) or not given:
        return False
    return _same(given, expected)


def log_in(request: web.Request) -> Session:
    """A fresh session for the admin, with a new CSRF token."""
    session = get_session(request)
    session.invalidate()
    session[_ADMIN] = True
    csrf_token(session)
    return session


def log_out(request: web.Request) -> None:
    get_session(request).invalidate()


def client_address(request: web.Request) -> str:
    """The peer address. Behind a reverse proxy every client shares the proxy's address, so
    the throttle then applies to all of them together: slower, never weaker."""
    return request.remote or "unknown"


class LoginThrottle:
    """Failed logins per client address, kept in this instance's memory.

    After :data:`MAX_LOGIN_FAILURES` failures within :data:`LOGIN_WINDOW_SECONDS`, the address
    must wait until the oldest of them leaves the window. A success forgets its failures.
    Several instances each count their own; a restart forgets everything.
    """

    def __init__(
        self,
        max_failures: int = MAX_LOGIN_FAILURES,
        window_seconds: float = LOGIN_WINDOW_SECONDS,
        *,
        max_clients: int = MAX_TRACKED_CLIENTS,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._max_failures = max_failures
        self._window = window_seconds
        self._max_clients = max_clients
        self._clock = clock
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def _recent(self, client: str) -> deque[float]:
        failures = self._failures.get(client, deque())
        horizon = self._clock() - self._window
        while failures and failures[0] <= horizon:
            failures.popleft()
        if not failures:
            self._failures.pop(client, None)
        return failures

    def retry_after(self, client: str) -> int:
        """Seconds before ``client`` may try again; 0 when it may now."""
        failures = self._recent(client)
        if len(failures) < self._max_failures:
            return 0
        return max(1, math.ceil(failures[0] + self._window - self._clock()))

    def failed(self, client: str) -> None:
        failures = self._recent(client)
        failures.append(self._clock())
        self._failures[client] = failures
        self._failures.move_to_end(client)
        while len(self._failures) > self._max_clients:
            self._failures.popitem(last=False)

    def succeeded(self, client: str) -> None:
        self._failures.pop(client, None)
