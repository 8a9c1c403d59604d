"""Who is logged in to the settings page (and through it to the admin API): the session
cookie, CSRF tokens, the same-origin check, login throttling.

The session is a small JSON document in a cookie signed with ``security.secret_key``
(itsdangerous' timestamped HMAC signature), so every instance sharing the secret key accepts
it, and a changed secret key logs everybody out. It holds the "logged in" flag, a random
session id, the moment it ends and the CSRF token; the cookie is ``HttpOnly``,
``SameSite=Lax``, ``Secure`` when the public URL is https. A logged-in session ends
:data:`SESSION_MAX_AGE_SECONDS` after logging in, or at logout: logging out records its id as
revoked in the database, which every instance reads for each request carrying a logged-in
cookie, so a copied cookie stops working everywhere at once.
"""

from __future__ import annotations

import hmac
import math
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from aiohttp import web
from itsdangerous import BadSignature, URLSafeTimedSerializer
from sqlalchemy.ext.asyncio import async_sessionmaker
from yarl import URL

from connector.db.kv import delete_stale, get_value, put_value
from connector.db.types import utcnow
from connector.settings.secrets import ServiceSecrets

SESSION_COOKIE = "connector_session"
# A working day: an operator setting the connector up is not logged out half-way.
SESSION_MAX_AGE_SECONDS = 12 * 3600
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# Paths that read the session; the platform's and Customer.io's endpoints never do.
SESSION_PATHS = ("/admin", "/api/")
# Separates this signature from any other use of the secret key.
_SALT = "connector.web.admin.session"

# Five wrong passwords from one address in 15 minutes, then that address waits: slow enough to
# make guessing hopeless, lenient enough for a few typos.
MAX_LOGIN_FAILURES = 5
LOGIN_WINDOW_SECONDS = 15 * 60
# Bounds the throttle's memory when many addresses try; the oldest are forgotten first.
MAX_TRACKED_CLIENTS = 10_000

_ADMIN = "admin"
_CSRF = "csrf"
_ID = "sid"
_ENDS = "ends"
# Key prefix of revoked session ids in the key-value table.
_REVOKED = "revoked-session:"


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
    """Reads and writes the session cookie, signed under the secret key, and revokes sessions
    in the database at logout."""

    def __init__(self, secrets: ServiceSecrets, sessionmaker: async_sessionmaker, *, secure: bool):
        self._secrets = secrets
        self._serializer: URLSafeTimedSerializer | None = None
        self._sessionmaker = sessionmaker
        self._secure = secure

    @property
    def serializer(self) -> URLSafeTimedSerializer:
        # The secret key is read from the database at start-up, after the routes are made.
        if self._serializer is None:
            self._serializer = URLSafeTimedSerializer(self._secrets.secret_key, salt=_SALT)
        return self._serializer

    async def load(self, request: web.Request) -> Session:
        cookie = request.cookies.get(SESSION_COOKIE)
        if not cookie:
            return Session()
        try:
            data = self.serializer.loads(cookie, max_age=SESSION_MAX_AGE_SECONDS)
        except BadSignature:
            return Session()
        if not isinstance(data, dict):
            return Session()
        if data.get(_ADMIN) is True and not await self._still_valid(data):
            return Session()
        return Session(data)

    async def _still_valid(self, data: dict[str, Any]) -> bool:
        """A logged-in session has an id, has not ended and was not logged out (on any
        instance); only this costs a database read, and only for logged-in cookies."""
        session_id, ends = data.get(_ID), data.get(_ENDS)
        if not isinstance(session_id, str) or not isinstance(ends, int | float):
            return False
        if ends <= time.time():
            return False
        async with self._sessionmaker() as db:
            return await get_value(db, _REVOKED + session_id) is None

    async def revoke(self, session: Session) -> None:
        """Refuse ``session``'s id from now on, and forget revocations of sessions that have
        ended anyway: each is kept for a session's lifetime after its logout."""
        session_id = session.get(_ID)
        if not isinstance(session_id, str):
            return
        now = utcnow()
        async with self._sessionmaker() as db, db.begin():
            await delete_stale(db, _REVOKED, now - timedelta(seconds=SESSION_MAX_AGE_SECONDS))
            await put_value(db, _REVOKED + session_id, {"ends": session.get(_ENDS)})

    def save(self, response: web.StreamResponse, session: Session) -> None:
        if not session:
            response.del_cookie(SESSION_COOKIE, path="/", secure=self._secure, samesite="Lax")
            return
        response.set_cookie(
            SESSION_COOKIE,
            self.serializer.dumps(dict(session)),
            path="/",
            max_age=SESSION_MAX_AGE_SECONDS,
            httponly=True,
            samesite="Lax",
            secure=self._secure,
        )

    async def log_out(self, request: web.Request) -> None:
        """End the session: its cookie, and every copy of it, is refused from now on."""
        session = get_session(request)
        await self.revoke(session)
        session.invalidate()

    @web.middleware
    async def middleware(self, request: web.Request, handler) -> web.StreamResponse:
        """Loads the session for the page and the admin API; sends it back when it changed."""
        if not request.path.startswith(SESSION_PATHS):
            return await handler(request)
        session = request[_session_key] = await self.load(request)
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            # Redirects are raised; they carry the cookie as well.
            if session.changed:
                self.save(exc, session)
            raise
        if session.changed:
            self.save(response, session)
        return response


def get_session(request: web.Request) -> Session:
    return request[_session_key]


def same_secret(given: str, expected: str) -> bool:
    """Compared in constant time."""
    return hmac.compare_digest(given.encode(), expected.encode())


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
    return same_secret(given, expected)


def log_in(request: web.Request) -> Session:
    """A fresh session for the admin, with a new id and CSRF token, ending in
    :data:`SESSION_MAX_AGE_SECONDS`."""
    session = get_session(request)
    session.invalidate()
    session[_ADMIN] = True
    session[_ID] = secrets.token_urlsafe(16)
    session[_ENDS] = int(time.time()) + SESSION_MAX_AGE_SECONDS
    csrf_token(session)
    return session


def _origin_allowed(request: web.Request, origin: str, public_url: str) -> bool:
    """``origin`` is the service's own: the public URL's, or the one the request was sent to
    (its ``Host``, whatever the scheme, since a proxy in front may terminate TLS)."""
    try:
        given = URL(origin)
    except ValueError:
        return False
    if given.scheme not in ("http", "https") or not given.host:
        return False
    public = URL(public_url)
    if (given.scheme, given.host, given.port) == (public.scheme, public.host, public.port):
        return True
    try:
        served = URL.build(scheme=given.scheme, authority=request.host)
    except ValueError:
        return False
    return (served.host, served.port) == (given.host, given.port)


def cross_site_refusal(request: web.Request, public_url: str) -> str | None:
    """Why a state-changing request to the page or the admin API is refused, if it is: an
    ``Origin`` header (browsers send one with every cross-site request that is not GET or HEAD)
    naming another site, or ``null``. Without ``Origin`` (scripts, older browsers) it passes, and
    the CSRF token or HTTP Basic still decide."""
    if request.method in SAFE_METHODS or not request.path.startswith(SESSION_PATHS):
        return None
    origin = request.headers.get("Origin")
    if origin is None or _origin_allowed(request, origin, public_url):
        return None
    return f"cross-site request refused: Origin {origin[:100]} is not this service"


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
