"""The admin API: connector settings, users and their sync state, starting a sync."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from marshmallow import ValidationError
from sqlalchemy import func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from connector.db.models import TrackedEvent, User, UserEvent
from connector.db.sync_state import has_status
from connector.inbound.gate import webhook_url
from connector.ops import quarantine, stats
from connector.ops.audit import AuditAction, settings_change
from connector.rules.safe_json import MAX_INTEGER
from connector.runtime import Runtime
from connector.settings.model import ConnectorSettings
from connector.users.identity import mapping_expression
from connector.web.auth import Auth
from connector.web.responses import json_error, json_response, read_json
from connector.web.security import client_address

RECENT_EVENTS = 50
MAX_USERS_LISTED = 100
DEFAULT_EVENTS_PAGE = 100
MAX_EVENTS_PAGE = 1000
DEFAULT_HISTORY_PAGE = 50
MAX_HISTORY_PAGE = 1000
VIA = "api"
"""How the admin API names itself in the run history and the audit log."""


def _event_json(event: UserEvent) -> dict[str, Any]:
    return {
        "event_id": event.event_id,
        "name": event.name,
        "occurred_at": event.occurred_at,
        "status": event.status,
        "reason": event.reason,
        "sent_at": event.sent_at,
    }


def user_json(user: User) -> dict[str, Any]:
    return {
        "id": user.id,
        "external_id": user.external_id,
        "email": user.email,
        "anonymous_ids": user.anonymous_ids,
        "segments": user.segments,
        "attributes": user.attributes,
        "account": user.account,
        "sync": {
            "status": user.sync_status,
            "pending": user.pending,
            "attempts": user.attempts,
            "next_attempt_at": user.next_attempt_at if user.pending else None,
            "skip_reason": user.skip_reason,
            "attribute_errors": user.attribute_errors,
        },
        "customerio": {
            "id": user.cio_id,
            "created_at": user.cio_created_at,
            "synced_at": user.cio_synced_at,
            "deleted_at": user.cio_deleted_at,
            "hash": user.cio_hash,
            "cio_id": user.cio_ref,
            "last_error": user.last_error,
            "sent_attributes": user.sent_attributes or {},
        },
        "updated_at": user.updated_at,
    }


def tracked_json(event: TrackedEvent) -> dict[str, Any]:
    return {
        "id": event.id,
        "event_id": event.event_id,
        "user_id": event.user_id,
        "name": event.name,
        "object_type": event.object_type,
        "metric": event.metric,
        "properties": event.properties,
        "context": event.context,
        "occurred_at": event.occurred_at,
        "received_at": event.created_at,
    }


def search_condition(q: str, user_id_mapping: str, dialect: str) -> Any:
    """Users that ``q`` names: their platform id, external id, customer id (the one sent to
    Customer.io, or the ``user_id_mapping`` value it will be), Customer.io's ``cio_id``, or
    their email (case-insensitively)."""
    return or_(
        User.id == q,
        User.external_id == q,
        User.cio_id == q,
        User.cio_ref == q,
        mapping_expression(user_id_mapping, dialect) == q,
        func.lower(User.email) == q.lower(),
    )


async def find_users(
    session: AsyncSession,
    user_id_mapping: str,
    *,
    q: str | None = None,
    email: str | None = None,
    external_id: str | None = None,
    status: str | None = None,
) -> list[User]:
    """Up to :data:`MAX_USERS_LISTED` users matching every filter given, by id."""
    query = select(User).order_by(User.id).limit(MAX_USERS_LISTED)
    if q:
        query = query.where(search_condition(q, user_id_mapping, session.bind.dialect.name))
    if email:
        query = query.where(User.email == email)
    if external_id:
        query = query.where(User.external_id == external_id)
    if status:
        query = query.where(has_status(status))
    return list((await session.scalars(query)).all())


async def user_detail(session: AsyncSession, user_id: str) -> dict[str, Any] | None:
    """The user as ``GET /api/users/{id}`` shows it, with its recent platform events (and
    their outcome) and tracked inbound events; None if there is no such user."""
    user = await session.get(User, user_id)
    if user is None:
        return None
    events = await session.scalars(
        select(UserEvent)
        .where(UserEvent.user_id == user_id)
        .order_by(UserEvent.received_at.desc(), UserEvent.id.desc())
        .limit(RECENT_EVENTS)
    )
    data = user_json(user)
    data["events"] = [_event_json(event) for event in events]
    tracked = await session.scalars(
        select(TrackedEvent)
        .where(TrackedEvent.user_id == user_id)
        .order_by(TrackedEvent.occurred_at.desc(), TrackedEvent.id.desc())
        .limit(RECENT_EVENTS)
    )
    data["tracked_events"] = [tracked_json(event) for event in tracked]
    return data


def _positive_int(raw: str | None, default: int, name: str) -> int:
    if raw is None or raw == "":
        return default
    # Bounded before int() (thousands of digits are slow, and refused by int() itself), and
    # to what a BIGINT column can be compared with.
    digits = raw.isascii() and raw.isdigit()
    if not digits or len(raw) > 19 or int(raw) > MAX_INTEGER:
        if raw.startswith("-") and raw[1:].isascii() and raw[1:].isdigit():
            raise web.HTTPBadRequest(reason=f"{name} must not be negative")
        raise web.HTTPBadRequest(reason=f"{name} must be a whole number below 2^63")
    return int(raw)


def _history_limit(request: web.Request) -> int:
    limit = _positive_int(request.query.get("limit"), DEFAULT_HISTORY_PAGE, "limit")
    if limit < 1:
        raise web.HTTPBadRequest(reason="limit must be at least 1")
    return min(limit, MAX_HISTORY_PAGE)


class AdminAPI:
    def __init__(self, runtime: Runtime):
        self._settings = runtime.settings
        self._changes = runtime.settings_changes
        self._sessionmaker = runtime.sessionmaker
        self._scheduler = runtime.scheduler
        self._outbound = runtime.sync.repository
        self._gate = runtime.gate
        self._audit = runtime.audit
        self._public_url = runtime.config.server.public_url
        sync = runtime.config.sync
        self._sync = {
            "transport": sync.transport,
            "batch_max_bytes": sync.batch_max_bytes,
            "batch_max_operations": sync.batch_max_operations,
        }

    def _shown(self, settings: ConnectorSettings) -> dict[str, Any]:
        """The settings as the API shows them, with the configuration file's transport."""
        return {**settings.masked(), "sync": self._sync}

    async def get_settings(self, request: web.Request) -> web.Response:
        settings = await self._settings.load()
        return json_response(self._shown(settings))

    async def patch_settings(self, request: web.Request) -> web.Response:
        patch = await read_json(request)
        if isinstance(patch, dict) and "sync" in patch:
            # Read-only here (the configuration file's): a GET's body may come back as it was.
            if patch["sync"] != self._sync:
                message = "set in the configuration file ([sync] transport, batch_max_*), not here"
                return json_response({"errors": {"sync": [message]}}, status=400)
            patch = {key: value for key, value in patch.items() if key != "sync"}
        try:
            saved = await self._changes.save(patch, by=VIA)
        except ValidationError as exc:
            return json_response({"errors": exc.messages}, status=400)
        if saved.changes:
            detail = {"via": VIA, **settings_change(saved.changes)}
            await self._audit.record(AuditAction.SETTINGS_CHANGED, detail, client_address(request))
        return json_response(self._shown(saved.settings))

    async def start_sync(self, request: web.Request) -> web.Response:
        wait = request.query.get("wait", "").lower() in ("1", "true", "yes")
        full = request.query.get("full", "").lower() in ("1", "true", "yes")
        await self._audit.record(
            AuditAction.SYNC_NOW, {"via": VIA, "full": full}, client_address(request)
        )
        summary = await self._scheduler.request_pass(VIA, full=full, wait=wait)
        if summary is None:
            return json_response({"started": True}, status=202)
        return json_response(summary.as_dict())

    async def retry_failed(self, request: web.Request) -> web.Response:
        """Quarantined users, webhooks and forwarded events become pending again (see
        :mod:`connector.ops.quarantine`); a sync and the webhook processing start at once."""
        retried = await self._scheduler.retry_failed(VIA)
        await self._audit.record(
            AuditAction.RETRY_FAILED, {"via": VIA, "retried": retried}, client_address(request)
        )
        return json_response({"retried": retried})

    async def list_runs(self, request: web.Request) -> web.Response:
        """The run history, newest first: every pass with its trigger and counts."""
        limit = _history_limit(request)
        async with self._sessionmaker() as session:
            return json_response({"runs": await stats.recent_runs(session, limit)})

    async def list_audit(self, request: web.Request) -> web.Response:
        """The audit log, newest first."""
        return json_response({"entries": await self._audit.recent(_history_limit(request))})

    async def list_deletions(self, request: web.Request) -> web.Response:
        """The deletions the deletion guard held, waiting for a confirmation."""
        held = await self._outbound.held_deletions()
        return json_response({"count": await self._outbound.count_held_deletions(), "users": held})

    async def confirm_deletions(self, request: web.Request) -> web.Response:
        """Confirm the held deletions (all, or the body's ``user_ids``); a pass sends them."""
        user_ids: list[str] | None = None
        if request.can_read_body:
            body = await read_json(request)
            if not isinstance(body, dict):
                return json_error(400, "the body must be an object")
            raw = body.get("user_ids")
            if raw is not None:
                if not isinstance(raw, list) or not all(isinstance(i, str) for i in raw):
                    return json_error(400, "user_ids must be a list of user ids")
                user_ids = raw
        confirmed = await self._outbound.confirm_deletions(user_ids)
        if confirmed:
            await self._audit.record(
                AuditAction.DELETIONS_CONFIRMED,
                {"via": VIA, "users": len(confirmed)},
                client_address(request),
            )
            await self._scheduler.request_pass(VIA)
        return json_response({"confirmed": len(confirmed), "user_ids": confirmed})

    async def get_quarantine(self, request: web.Request) -> web.Response:
        """How many records each pipeline set aside, with the latest reason."""
        async with self._sessionmaker() as session:
            held = await quarantine.quarantined(session)
        return json_response({name: item.as_dict() for name, item in held.items()})

    async def get_user(self, request: web.Request) -> web.Response:
        user_id = request.match_info["user_id"]
        async with self._sessionmaker() as session:
            data = await user_detail(session, user_id)
        if data is None:
            return json_error(404, f"no user {user_id!r}")
        return json_response(data)

    async def find_users(self, request: web.Request) -> web.Response:
        settings = await self._settings.load()
        async with self._sessionmaker() as session:
            users = await find_users(
                session,
                settings.user_id_mapping,
                q=request.query.get("q", "").strip(),
                email=request.query.get("email"),
                external_id=request.query.get("external_id"),
                status=request.query.get("status"),
            )
        return json_response({"users": [user_json(user) for user in users]})

    async def list_events(self, request: web.Request) -> web.Response:
        """Tracked inbound events, oldest first; ``after`` is the ``next`` cursor of a page."""
        limit = min(
            _positive_int(request.query.get("limit"), DEFAULT_EVENTS_PAGE, "limit"), MAX_EVENTS_PAGE
        )
        after = _positive_int(request.query.get("after"), 0, "after")
        query = (
            select(TrackedEvent)
            .where(TrackedEvent.id > after)
            .order_by(TrackedEvent.id)
            .limit(limit)
        )
        if user_id := request.query.get("user_id"):
            query = query.where(TrackedEvent.user_id == user_id)
        if name := request.query.get("name"):
            query = query.where(TrackedEvent.name == name)
        async with self._sessionmaker() as session:
            events = (await session.scalars(query)).all()
        next_cursor = events[-1].id if len(events) == limit and events else None
        return json_response({"events": [tracked_json(e) for e in events], "next": next_cursor})

    async def inbound_stats(self, request: web.Request) -> web.Response:
        """Webhooks by delivery status, tracked events by name, unmatched events, the last
        arrival."""
        async with self._sessionmaker() as session:
            return json_response(await stats.inbound_stats(session))

    async def catalog(self, request: web.Request) -> web.Response:
        """What the platform has sent: segments (id and name), attribute paths, event names.

        ``page`` is always offered among the events: it turns on page views.
        """
        async with self._sessionmaker() as session:
            return json_response(await stats.catalog(session))

    async def get_webhook_url(self, request: web.Request) -> web.Response:
        gate = await self._gate.refresh()
        public_url = self._public_url
        return json_response({"url": webhook_url(public_url, gate.token)})

    async def rotate_webhook_url(self, request: web.Request) -> web.Response:
        token = await self._gate.rotate()
        await self._audit.record(
            AuditAction.WEBHOOK_URL_ROTATED, {"via": VIA}, client_address(request)
        )
        public_url = self._public_url
        return json_response({"url": webhook_url(public_url, token)})


def setup_api(app: web.Application, runtime: Runtime, auth: Auth) -> None:
    api = AdminAPI(runtime)
    app.router.add_get("/api/settings", auth.admin(api.get_settings))
    app.router.add_patch("/api/settings", auth.admin(api.patch_settings))
    app.router.add_post("/api/sync", auth.admin(api.start_sync))
    app.router.add_get("/api/quarantine", auth.admin(api.get_quarantine))
    app.router.add_post("/api/retry-failed", auth.admin(api.retry_failed))
    app.router.add_get("/api/runs", auth.admin(api.list_runs))
    app.router.add_get("/api/audit", auth.admin(api.list_audit))
    app.router.add_get("/api/deletions", auth.admin(api.list_deletions))
    app.router.add_post("/api/deletions/confirm", auth.admin(api.confirm_deletions))
    app.router.add_get("/api/users", auth.admin(api.find_users))
    app.router.add_get("/api/users/{user_id}", auth.admin(api.get_user))
    app.router.add_get("/api/events", auth.admin(api.list_events))
    app.router.add_get("/api/inbound/stats", auth.admin(api.inbound_stats))
    app.router.add_get("/api/catalog", auth.admin(api.catalog))
    app.router.add_get("/api/webhook-url", auth.admin(api.get_webhook_url))
    app.router.add_post("/api/webhook-url/rotate", auth.admin(api.rotate_webhook_url))
