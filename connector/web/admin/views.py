"""The settings page's handlers: log in and out, show the page, save, test, rotate, sync."""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import aiohttp_jinja2
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from marshmallow import ValidationError
from multidict import MultiDictProxy

from connector.inbound.gate import webhook_url
from connector.ops import quarantine, stats
from connector.ops.audit import AuditAction, settings_change
from connector.outbound.sender import CredentialCheck
from connector.rules.traits import unprefixed
from connector.runtime import Runtime
from connector.settings.model import SECRET_FIELDS
from connector.web.api import find_users, user_detail, user_json
from connector.web.auth import Auth
from connector.web.security import (
    CSRF_FIELD,
    AdminSessions,
    Session,
    admin_session,
    client_address,
    csrf_token,
    csrf_valid,
    get_session,
    log_in,
)

PAGE = "/admin"
HELD_DELETIONS_SHOWN = 50
LOGIN = "/admin/login"
USERS = "/admin/users"
VIA = "page"
"""How the settings page names itself in the run history and the audit log."""
RUNS_SHOWN = 20
AUDIT_SHOWN = 20
TEXT_FIELDS = (
    "site_id",
    "region",
    "user_id_mapping",
    "max_attributes_per_call",
    "webhook_timestamp_tolerance_seconds",
    "forward_url",
    "forward_event_prefix",
)
FLAG_FIELDS = ("enable_user_deletion", "anonymous_events")
LIST_FIELDS = ("synchronized_segments", "synchronized_attributes", "events_filter")
_SEPARATORS = re.compile(r"[,\r\n]+")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def user_page(user_id: str) -> str:
    """The user debugger's address of one user."""
    return f"{USERS}/{urllib.parse.quote(user_id, safe='')}"


def _see_other(location: str) -> web.HTTPSeeOther:
    return web.HTTPSeeOther(location)


async def root(request: web.Request) -> web.StreamResponse:
    """A newcomer opening the service's address lands on the settings page."""
    raise web.HTTPFound(PAGE)


class UnreadableForm(Exception):
    """The body is not a form aiohttp can decode: unknown charset, invalid UTF-8, a multipart
    body without its boundary or with a part it cannot decode."""


async def read_form(request: web.Request) -> MultiDictProxy:
    try:
        return await request.post()
    except (ValueError, LookupError, RuntimeError, HttpProcessingError) as exc:
        # ValueError covers UnicodeDecodeError and multipart framing; LookupError an unknown
        # charset; RuntimeError an unknown Content-Transfer-Encoding of a part;
        # HttpProcessingError a part's header aiohttp's parser refuses (NUL, a stray quote).
        raise UnreadableForm(str(exc)[:200]) from exc


def _unreadable(request: web.Request, exc: UnreadableForm) -> web.Response:
    context = {"title": "Form not readable", "message": _unreadable_message(exc)}
    return aiohttp_jinja2.render_template("refused.html", request, context, status=400)


def _unreadable_message(exc: UnreadableForm) -> str:
    return f"The form could not be read ({exc}). Nothing was changed."


def login_required(handler: Handler) -> Handler:
    """Anonymous requests go to the login form; a form post must be readable and carry the
    session's token."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        session = admin_session(request)
        if session is None:
            raise _see_other(LOGIN)
        if request.method == "POST":
            try:
                form = await read_form(request)
            except UnreadableForm as exc:
                return _unreadable(request, exc)
            if not csrf_valid(session, _text(form.get(CSRF_FIELD))):
                return _forbidden(request)
        return await handler(request)

    return wrapped


def _forbidden(request: web.Request) -> web.Response:
    return aiohttp_jinja2.render_template(
        "forbidden.html", request, {"title": "Form expired"}, status=403
    )


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


@dataclass(frozen=True)
class Choice:
    value: str
    label: str
    checked: bool
    seen: bool = True
    """False for a stored value the platform has not sent (yet)."""


def _choices(
    options: Iterable[tuple[str, str]],
    selected: Iterable[str],
    same: Callable[[str], str] = str,
) -> list[Choice]:
    """Ticked values first, in their stored order (saving the form unchanged changes nothing),
    then the rest of what the platform has sent; values with the same ``same(value)`` are one
    choice (a ticked ``traits_x`` is the ``x`` the platform sent)."""
    known = dict(options)
    seen = {same(v) for v in known}
    chosen = list(dict.fromkeys(selected))
    taken = {same(v) for v in chosen}
    ticked = [Choice(v, known.get(v, v), True, seen=same(v) in seen) for v in chosen]
    rest = [Choice(v, label, False) for v, label in known.items() if same(v) not in taken]
    return ticked + rest


def _messages(found: Any) -> list[str]:
    """marshmallow's messages for one field, flattened (lists report per item)."""
    if isinstance(found, str):
        return [found]
    if isinstance(found, dict):
        return [m for value in found.values() for m in _messages(value)]
    if isinstance(found, list):
        return [m for value in found for m in _messages(value)]
    return [str(found)]


def _split(text: str) -> list[str]:
    return [part.strip() for part in _SEPARATORS.split(text) if part.strip()]


def form_patch(form: MultiDictProxy) -> dict[str, Any]:
    """The settings the page's form sets, as a ``PATCH /api/settings`` body.

    An empty secret field keeps the stored secret; its "clear" box empties it. A checkbox and
    a picker come with a hidden field of the same name, so "none ticked" is told apart from
    "not on this form".
    """
    patch: dict[str, Any] = {}
    for name in TEXT_FIELDS:
        if name in form:
            patch[name] = str(form[name]).strip()
    for name in SECRET_FIELDS:
        entered = str(form.get(name, "")).strip()
        if entered:
            patch[name] = entered
        elif form.get(f"clear_{name}") == "on":
            patch[name] = ""
    for name in FLAG_FIELDS:
        if name in form:
            patch[name] = form.getall(name)[-1] == "on"
    for name in LIST_FIELDS:
        if name in form:
            picked = [str(v).strip() for v in form.getall(name)]
            other = _split(str(form.get(f"{name}_other", "")))
            patch[name] = list(dict.fromkeys(v for v in picked + other if v))
    if "incoming_metrics" in form:
        all_metrics = form.get("incoming_metrics_all") == "on"
        patch["incoming_metrics"] = None if all_metrics else _split(str(form["incoming_metrics"]))
    return patch


def _flash(request: web.Request, text: str) -> None:
    (get_session(request))["flash"] = text


class SettingsPage:
    """The page's handlers, with what they work on."""

    def __init__(self, runtime: Runtime, auth: Auth, sessions: AdminSessions):
        self._auth = auth
        self._sessions = sessions
        self._settings = runtime.settings
        self._changes = runtime.settings_changes
        self._credentials = runtime.credentials
        self._checker = runtime.credential_checker
        self._sessionmaker = runtime.sessionmaker
        self._gate = runtime.gate
        self._scheduler = runtime.scheduler
        self._audit = runtime.audit
        self._scheduled = runtime.config.sync.scheduled
        self._sync_config = runtime.config.sync
        self._outbound = runtime.sync.repository
        self._public_url = runtime.config.server.public_url

    async def login_form(self, request: web.Request) -> web.StreamResponse:
        if admin_session(request) is not None:
            raise _see_other(PAGE)
        return await self._render_login(request)

    async def _render_login(
        self, request: web.Request, error: str | None = None, status: int = 200
    ) -> web.Response:
        session = get_session(request)
        context = {"title": "Log in", "csrf_token": csrf_token(session), "error": error}
        return aiohttp_jinja2.render_template("login.html", request, context, status=status)

    async def login(self, request: web.Request) -> web.StreamResponse:
        throttle = self._auth.throttle
        client = client_address(request)
        try:
            form = await read_form(request)
        except UnreadableForm as exc:
            return await self._render_login(request, _unreadable_message(exc), status=400)
        session = get_session(request)
        if not csrf_valid(session, _text(form.get(CSRF_FIELD))):
            return _forbidden(request)
        wait = throttle.retry_after(client)
        if wait:
            await self._audit.record(
                AuditAction.LOGIN_FAILED, {"via": VIA, "reason": "throttled"}, client
            )
            response = await self._render_login(
                request, f"Too many failed attempts. Try again in {wait} seconds.", status=429
            )
            response.headers["Retry-After"] = str(wait)
            return response
        if not self._auth.password_ok(_text(form.get("password")) or ""):
            throttle.failed(client)
            await self._audit.record(
                AuditAction.LOGIN_FAILED, {"via": VIA, "reason": "wrong password"}, client
            )
            return await self._render_login(request, "Wrong password.", status=401)
        throttle.succeeded(client)
        log_in(request)
        await self._audit.record(AuditAction.LOGIN, {"via": VIA}, client)
        raise _see_other(PAGE)

    async def logout(self, request: web.Request) -> web.StreamResponse:
        await self._sessions.log_out(request)
        raise _see_other(LOGIN)

    async def _page_context(
        self,
        request: web.Request,
        session: Session,
        *,
        entered: dict[str, Any] | None = None,
        errors: dict[str, Any] | None = None,
        test: CredentialCheck | None = None,
    ) -> dict[str, Any]:
        settings = await self._settings.load()
        values = settings.to_dict()
        values.update({key: value for key, value in (entered or {}).items() if key in values})
        for key in SECRET_FIELDS:
            values[key] = ""
        async with self._sessionmaker() as db:
            catalog = await stats.catalog(db)
            inbound = await stats.inbound_stats(db)
            outbound = await stats.outbound_stats(db)
            held = await quarantine.quarantined(db)
            runs = await stats.recent_runs(db, RUNS_SHOWN)
        held_deletions = await self._outbound.held_deletions(limit=HELD_DELETIONS_SHOWN)
        held_count = await self._outbound.count_held_deletions()
        gate = await self._gate.current()
        status = await stats.service_status(self._sessionmaker, self._settings, self._credentials)
        metrics = values["incoming_metrics"]
        return {
            "title": "Customer.io connector",
            "csrf_token": csrf_token(session),
            "values": values,
            "secrets_set": {key: bool(getattr(settings, key)) for key in SECRET_FIELDS},
            "errors": {key: _messages(value) for key, value in (errors or {}).items()},
            "segments": _choices(
                ((s["id"], s["name"]) for s in catalog["segments"]), values["synchronized_segments"]
            ),
            "attributes": _choices(
                ((a, a) for a in catalog["attributes"]),
                values["synchronized_attributes"],
                same=unprefixed,
            ),
            "events": _choices(((e, e) for e in catalog["events"]), values["events_filter"]),
            "all_metrics": metrics is None,
            "metrics_text": "\n".join(metrics or []),
            "webhook_url": webhook_url(self._public_url, gate.token),
            "inbound": inbound,
            "outbound": outbound,
            "quarantine": held,
            "runs": runs,
            "audit": await self._audit.recent(AUDIT_SHOWN),
            "held_deletions": held_deletions,
            "held_deletions_count": held_count,
            "status": status,
            "credentials": await self._credentials.get(),
            "test": test,
            "flash": session.pop("flash", None),
            "user_page": user_page,
            "sync_config": self._sync_config,
            "users_per_request": stats.users_per_request,
        }

    async def page(self, request: web.Request) -> web.Response:
        session = get_session(request)
        context = await self._page_context(request, session)
        return aiohttp_jinja2.render_template("page.html", request, context)

    async def users(self, request: web.Request) -> web.StreamResponse:
        """The user debugger's search (``q``: see :func:`connector.web.api.search_condition`);
        a search that finds one user opens it."""
        q = request.query.get("q", "").strip()
        found = []
        if q:
            settings = await self._settings.load()
            async with self._sessionmaker() as db:
                found = await find_users(db, settings.user_id_mapping, q=q)
            if len(found) == 1:
                raise _see_other(user_page(found[0].id))
        return self._render_users(request, q, [user_json(user) for user in found])

    def _render_users(
        self, request: web.Request, q: str, users: list[dict[str, Any]], status: int = 200
    ) -> web.Response:
        context = {
            "title": "Users",
            "csrf_token": csrf_token(get_session(request)),
            "q": q,
            "users": users,
            "user_page": user_page,
            "sync_config": self._sync_config,
            "users_per_request": stats.users_per_request,
        }
        return aiohttp_jinja2.render_template("users.html", request, context, status=status)

    async def user(self, request: web.Request) -> web.StreamResponse:
        """One user: segments, sync status and reasons, what was last sent and Customer.io's
        answers, the attributes left out, the events sent and the tracked inbound events."""
        user_id = request.match_info["user_id"]
        async with self._sessionmaker() as db:
            user = await user_detail(db, user_id)
        if user is None:
            return self._render_users(request, user_id, [], status=404)
        context = {
            "title": f"User {user_id}",
            "csrf_token": csrf_token(get_session(request)),
            "q": "",
            "user": user,
        }
        return aiohttp_jinja2.render_template("user.html", request, context)

    async def save(self, request: web.Request) -> web.StreamResponse:
        patch = form_patch(await read_form(request))
        try:
            saved = await self._changes.save(patch, by=VIA)
        except ValidationError as exc:
            session = get_session(request)
            context = await self._page_context(request, session, entered=patch, errors=exc.messages)
            return aiohttp_jinja2.render_template("page.html", request, context, status=400)
        if saved.changes:
            detail = {"via": VIA, **settings_change(saved.changes)}
            await self._audit.record(AuditAction.SETTINGS_CHANGED, detail, client_address(request))
        _flash(request, "Settings saved.")
        raise _see_other(PAGE)

    async def test_connection(self, request: web.Request) -> web.StreamResponse:
        """Check the credentials on the form; an empty API key field means the stored key."""
        patch = form_patch(await read_form(request))
        stored = await self._settings.load()
        site_id = patch.get("site_id", stored.site_id)
        api_key = patch.get("api_key") or stored.api_key
        region = patch.get("region", stored.region)
        errors: dict[str, list[str]] = {}
        if not site_id:
            errors["site_id"] = ["Enter the Site ID to test."]
        if not api_key:
            errors["api_key"] = ["Enter the API key to test."]
        if region not in ("us", "eu"):
            errors["region"] = ["Must be one of: us, eu."]
        result = None
        if not errors:
            checker = self._checker
            result = await checker.check(site_id, api_key, region)
            if (site_id, api_key, region) == (stored.site_id, stored.api_key, stored.region):
                await checker.record(result)
        session = get_session(request)
        context = await self._page_context(
            request, session, entered=patch, errors=errors, test=result
        )
        return aiohttp_jinja2.render_template("page.html", request, context)

    async def rotate_webhook_url(self, request: web.Request) -> web.StreamResponse:
        await self._gate.rotate()
        await self._audit.record(
            AuditAction.WEBHOOK_URL_ROTATED, {"via": VIA}, client_address(request)
        )
        _flash(request, "New webhook URL: paste it into Customer.io; the old one is refused.")
        raise _see_other(f"{PAGE}#incoming")

    async def sync_now(self, request: web.Request) -> web.StreamResponse:
        """ "Sync now": on the schedule's job when the sync runs in the service (the page shows
        its outcome later), else right here, with its counts."""
        await self._audit.record(
            AuditAction.SYNC_NOW, {"via": VIA, "full": False}, client_address(request)
        )
        summary = await self._scheduler.request_pass(VIA, wait=not self._scheduled)
        if summary is None:
            _flash(request, "Sync started.")
        else:
            _flash(request, f"Sync finished: {summary.sent} sent, {summary.failed} failed.")
        raise _see_other(f"{PAGE}#status")

    async def retry_failed(self, request: web.Request) -> web.StreamResponse:
        """What the pipelines set aside becomes pending again (after a fix)."""
        retried = await self._scheduler.retry_failed(VIA)
        await self._audit.record(
            AuditAction.RETRY_FAILED, {"via": VIA, "retried": retried}, client_address(request)
        )
        _flash(
            request,
            f"Retrying {retried['users']} user(s), {retried['webhooks']} webhook(s) and "
            f"{retried['forwarding']} forwarded event(s).",
        )
        raise _see_other(f"{PAGE}#status")

    async def confirm_deletions(self, request: web.Request) -> web.StreamResponse:
        """*Confirm deletions*: the held deletions become pending, and a pass sends them."""
        confirmed = await self._outbound.confirm_deletions()
        if confirmed:
            await self._audit.record(
                AuditAction.DELETIONS_CONFIRMED,
                {"via": VIA, "users": len(confirmed)},
                client_address(request),
            )
            await self._scheduler.request_pass(VIA, wait=not self._scheduled)
        _flash(request, f"{len(confirmed)} deletion(s) confirmed: the next pass sends them.")
        raise _see_other(f"{PAGE}#deletions")


def setup_routes(
    app: web.Application, runtime: Runtime, auth: Auth, sessions: AdminSessions
) -> None:
    page = SettingsPage(runtime, auth, sessions)
    app.router.add_get("/", root)
    app.router.add_get(PAGE, login_required(page.page))
    app.router.add_get(LOGIN, page.login_form)
    app.router.add_post(LOGIN, page.login)
    app.router.add_post("/admin/logout", login_required(page.logout))
    app.router.add_get(USERS, login_required(page.users))
    app.router.add_get(f"{USERS}/{{user_id}}", login_required(page.user))
    app.router.add_post("/admin/settings", login_required(page.save))
    app.router.add_post("/admin/test-connection", login_required(page.test_connection))
    app.router.add_post("/admin/webhook-url/rotate", login_required(page.rotate_webhook_url))
    app.router.add_post("/admin/sync", login_required(page.sync_now))
    app.router.add_post("/admin/retry-failed", login_required(page.retry_failed))
    app.router.add_post("/admin/deletions/confirm", login_required(page.confirm_deletions))
