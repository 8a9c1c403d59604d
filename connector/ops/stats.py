"""Read-only queries about what the connector has done, shared by the admin API and the page."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from connector.db.models import (
    CatalogEntry,
    ForwardMessage,
    SyncRun,
    TrackedEvent,
    User,
    WebhookDelivery,
)
from connector.db.sync_state import SyncStatus, failed_for_good, held_deletion
from connector.ops.quarantine import quarantined
from connector.ops.status import CredentialStatusStore, Status, compute_status
from connector.rules.traits import unprefixed
from connector.settings.store import SettingsStore

PAGE_EVENT = "page"
"""Always offered among the events: it turns on page views."""
USERS_LISTED = 10


async def inbound_stats(session: AsyncSession) -> dict[str, Any]:
    """Webhooks by delivery status, tracked events by name, unmatched events, the last arrival."""
    by_status = dict(
        (
            await session.execute(
                select(WebhookDelivery.status, func.count()).group_by(WebhookDelivery.status)
            )
        ).all()
    )
    by_name = dict(
        (
            await session.execute(
                select(TrackedEvent.name, func.count())
                .group_by(TrackedEvent.name)
                .order_by(TrackedEvent.name)
            )
        ).all()
    )
    unmatched = await session.scalar(select(func.count()).where(TrackedEvent.user_id.is_(None)))
    last = await session.scalar(select(func.max(WebhookDelivery.received_at)))
    return {
        "deliveries": by_status,
        "events": by_name,
        "unmatched": unmatched or 0,
        "last_received_at": last,
    }


async def catalog(session: AsyncSession) -> dict[str, Any]:
    """What the platform has sent: segments (id and name), attribute paths, event names."""
    entries = (
        await session.scalars(select(CatalogEntry).order_by(CatalogEntry.kind, CatalogEntry.key))
    ).all()
    events = sorted({e.key for e in entries if e.kind == "event"} | {PAGE_EVENT})
    return {
        "segments": [
            {"id": e.key, "name": e.label or e.key} for e in entries if e.kind == "segment"
        ],
        "attributes": sorted({unprefixed(e.key) for e in entries if e.kind == "attribute"}),
        "events": events,
    }


@dataclass(frozen=True)
class UserLine:
    id: str
    status: SyncStatus
    attempts: int
    reason: str | None
    updated_at: datetime | None


@dataclass(frozen=True)
class OutboundStats:
    last_run: SyncRun | None
    pending: int
    failed: int
    pending_users: list[UserLine]
    failed_users: list[UserLine]


def _line(user: User) -> UserLine:
    return UserLine(
        id=user.id,
        status=SyncStatus(user.sync_status),
        attempts=user.attempts,
        reason=user.last_error or user.skip_reason,
        updated_at=user.updated_at,
    )


async def last_finished_run(session: AsyncSession) -> SyncRun | None:
    return await session.scalar(
        select(SyncRun)
        .where(SyncRun.finished_at.is_not(None), SyncRun.dry_run.is_(False))
        .order_by(SyncRun.id.desc())
        .limit(1)
    )


async def outbound_stats(session: AsyncSession, listed: int = USERS_LISTED) -> OutboundStats:
    """The last finished pass, and the users waiting or failed for good (a few, newest first)."""
    pending = await session.scalar(select(func.count()).where(User.pending.is_(True)))
    failed = await session.scalar(select(func.count()).where(failed_for_good()))
    newest_first = (User.updated_at.desc(), User.id)
    pending_users = await session.scalars(
        select(User).where(User.pending.is_(True)).order_by(*newest_first).limit(listed)
    )
    failed_users = await session.scalars(
        select(User).where(failed_for_good()).order_by(*newest_first).limit(listed)
    )
    return OutboundStats(
        last_run=await last_finished_run(session),
        pending=pending or 0,
        failed=failed or 0,
        pending_users=[_line(user) for user in pending_users],
        failed_users=[_line(user) for user in failed_users],
    )


async def service_status(
    sessionmaker: async_sessionmaker,
    settings: SettingsStore,
    credentials: CredentialStatusStore,
) -> Status:
    """What ``GET /status`` reports: the rules of :func:`compute_status` over stored facts."""
    current = await settings.load()
    checked = await credentials.get()
    call_failures = await credentials.call_failures()
    async with sessionmaker() as session:
        last_run = await last_finished_run(session)
        failed = await session.scalar(select(func.count()).where(failed_for_good()))
        held = await quarantined(session)
        held_deletions = await session.scalar(select(func.count()).where(held_deletion()))
        forwarding_error = await session.scalar(
            select(ForwardMessage.last_error)
            .where(ForwardMessage.status == "pending", ForwardMessage.last_error.is_not(None))
            .order_by(ForwardMessage.id.desc())
            .limit(1)
        )
    last_error = last_run.error if last_run is not None else None
    return compute_status(
        current,
        checked,
        last_error,
        failed or 0,
        forwarding_error,
        last_run_at=last_run.finished_at if last_run is not None else None,
        call_failures=call_failures,
        quarantine=held,
        held_deletions=held_deletions or 0,
    )


def users_per_request(run: SyncRun) -> float | None:
    """Users in one ``/api/v2/batch`` request of the pass on average (one decimal); None when
    it sent none."""
    if not run.batch_requests:
        return None
    return round(run.batch_users / run.batch_requests, 1)


def run_json(run: SyncRun) -> dict[str, Any]:
    """One pass of the run history as ``GET /api/runs`` and the page show it."""
    return {
        "id": run.id,
        "trigger": run.trigger,
        "full": run.full,
        "instance": run.instance,
        "started_at": run.started_at,
        "finished_at": run.finished_at,
        "sent": run.users_sent,
        "skipped": run.users_skipped,
        "deleted": run.users_deleted,
        "held": run.users_held,
        "failed": run.users_failed,
        "retrying": run.users_retrying,
        "events": run.events_sent,
        "requests": run.api_calls,
        "transport": run.transport,
        "users_per_request": users_per_request(run),
        "error": run.error,
        "errors": run.error_reasons or [],
    }


async def recent_runs(session: AsyncSession, limit: int) -> list[dict[str, Any]]:
    """The newest ``limit`` passes, newest first; one under way has no ``finished_at``."""
    runs = await session.scalars(
        select(SyncRun).where(SyncRun.dry_run.is_(False)).order_by(SyncRun.id.desc()).limit(limit)
    )
    return [run_json(run) for run in runs]
