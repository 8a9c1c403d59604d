"""The outbound work queue in the database: claiming pending users, and writing results back.

Claims are conditional updates, with ``FOR UPDATE SKIP LOCKED`` on PostgreSQL, so several
instances sharing one database split the pending users between them and none sends a user
another instance is sending. A claim is a lease: an instance that dies mid-pass lets its
users go when the lease runs out.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from sqlalchemy import Row, and_, bindparam, delete, func, or_, select, true, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from connector.db import sync_state
from connector.db.claims import claim_rows, unclaimed
from connector.db.models import CatalogEntry, SyncRun, User, UserEvent
from connector.db.sync_state import SyncStatus
from connector.db.types import utcnow
from connector.notifications.parse import PlatformEvent
from connector.outbound.operations import UserSnapshot


@dataclass
class ClaimedUser:
    snapshot: UserSnapshot
    version: int
    attempts: int


@dataclass
class UserOutcome:
    """What one pass did for one user; :meth:`OutboundRepository.finish` stores it."""

    status: SyncStatus | Literal["retry", "released"]
    """What the pass leaves: a settled user's status (``synced``, ``anonymous``, ``skipped``,
    ``deleted``, ``failed``), ``retry`` (``retrying``, or ``failed`` when it gives up), or
    ``released`` (not reached: left as it was)."""
    customer_id: str | None = None
    reason: str | None = None
    attribute_errors: dict[str, str] = field(default_factory=dict)
    sent_attributes: dict[str, Any] = field(default_factory=dict)
    """Attributes Customer.io confirmed in this pass."""
    full_hash: str | None = None
    """Set when every identify call of the pass succeeded."""
    identified: bool = False
    deleted: bool = False
    event_results: dict[str, tuple[str, str | None]] = field(default_factory=dict)
    """Platform ``event_id`` → (``sent``/``skipped``/``failed``, reason)."""
    api_calls: int = 0
    progressed: bool = False
    """Some operation was settled in this pass (sent, or refused for good): not sent again."""
    throttled: bool = False
    """A ``retry`` because Customer.io kept answering 429: no attempt is counted."""
    retry_after: float | None = None
    attempts: int = 0
    """A ``retry``'s attempts at the operation the user is held up at (see the engine)."""


Finished = tuple[ClaimedUser, UserOutcome, datetime | None]
"""A user's claim, what the pass did for it, and when a ``retry`` may be tried again."""

RUNS_KEPT = 1000
"""The run history: recording a pass deletes the runs older than the newest this many."""

_users = User.__table__
_events = UserEvent.__table__

# What a pass reads of a claimed user: its snapshot and the state its write-back checks.
_SNAPSHOT_COLUMNS = (
    _users.c.id,
    _users.c.external_id,
    _users.c.email,
    _users.c.anonymous_ids,
    _users.c.attributes,
    _users.c.account,
    _users.c.segments,
    _users.c.via_batch,
    _users.c.full_sync,
    _users.c.sent_attributes,
    _users.c.cio_id,
    _users.c.cio_created_at,
    _users.c.cio_deleted_at,
    _users.c.sync_status,
    _users.c.version,
    _users.c.attempts,
    _users.c.pending_since,
)
_EVENT_COLUMNS = (
    _events.c.user_id,
    _events.c.event_id,
    _events.c.name,
    _events.c.properties,
    _events.c.context,
    _events.c.occurred_at,
)
# What the write-back reads of a user before it changes it (it writes more: see _UserState).
_WRITE_BACK_READS = (
    _users.c.id,
    _users.c.version,
    _users.c.pending,
    _users.c.sync_status,
    _users.c.cio_created_at,
    _users.c.cio_deleted_at,
    _users.c.sent_attributes,
    _users.c.last_error,
)
_QUEUE_START = datetime.min.replace(tzinfo=UTC)

_EVENT_RESULT = (
    update(_events)
    .where(
        _events.c.user_id == bindparam("b_user_id"),
        _events.c.event_id == bindparam("b_event_id"),
    )
    .values(
        status=bindparam("b_status"), reason=bindparam("b_reason"), sent_at=bindparam("b_sent_at")
    )
)
_FAIL_PENDING_EVENTS = (
    update(_events)
    .where(_events.c.user_id == bindparam("b_user_id"), _events.c.status == "pending")
    .values(status="failed", reason=bindparam("b_reason"))
)


def _claimable(now: datetime, due_by: datetime | None = None) -> Any:
    return and_(
        User.pending.is_(True),
        or_(User.next_attempt_at.is_(None), User.next_attempt_at <= (due_by or now)),
        unclaimed(User.claimed_until, now),
    )


class OutboundRepository:
    def __init__(self, sessionmaker: async_sessionmaker, instance_id: str, lease_seconds: float):
        self._sessionmaker = sessionmaker
        self.instance_id = instance_id
        self._lease = timedelta(seconds=lease_seconds)

    async def count_claimable(self) -> int:
        async with self._sessionmaker() as session:
            return await session.scalar(select(func.count()).where(_claimable(utcnow()))) or 0

    async def mark_all_pending(self, *, full: bool) -> int:
        """Every known user is looked at again: after a mapping change, or ``sync --full``
        (``full``: every attribute is sent again, not only what changed)."""
        async with self._sessionmaker() as session, session.begin():
            return await sync_state.mark_all_pending(session, utcnow(), full=full)

    async def claim(self, limit: int, due_by: datetime | None = None) -> list[ClaimedUser]:
        """Lease up to ``limit`` pending users due by ``due_by`` (default: now) and load them,
        oldest pending first: one ``UPDATE … RETURNING`` of their snapshots, one ``SELECT`` of
        their pending events.

        A pass claims what was due when it started, so a user it sets back for a retry, or
        one that changes meanwhile, waits for the next pass.
        """
        now = utcnow()
        async with self._sessionmaker() as session, session.begin():
            claimed = await claim_rows(
                session,
                User,
                claimable=_claimable(now, due_by),
                order_by=(User.pending_since, User.id),
                limit=limit,
                values={"claimed_by": self.instance_id, "claimed_until": now + self._lease},
                returning=_SNAPSHOT_COLUMNS,
            )
            # RETURNING keeps no order: the pass works in the queue's.
            rows = sorted(claimed, key=lambda row: (row.pending_since or _QUEUE_START, row.id))
            if not rows:
                return []
            return await self._with_events(session, rows)

    async def peek(
        self,
        limit: int,
        offset: int = 0,
        *,
        due_by: datetime | None = None,
        full: bool = False,
    ) -> list[ClaimedUser]:
        """Pending users as a pass would see them, without claiming anything (dry runs, and
        the deletion guard's count). ``due_by``: only those a pass starting then claims.
        ``full``: every user, as ``sync --full`` would make them pending."""
        if full:
            condition: Any = true()
        elif due_by is not None:
            condition = _claimable(utcnow(), due_by)
        else:
            condition = User.pending.is_(True)
        async with self._sessionmaker() as session:
            rows = (
                await session.execute(
                    select(*_SNAPSHOT_COLUMNS)
                    .where(condition)
                    .order_by(_users.c.pending_since, _users.c.id)
                    .limit(limit)
                    .offset(offset)
                )
            ).all()
            users = await self._with_events(session, rows) if rows else []
        if full:
            for claimed in users:
                claimed.snapshot = replace(claimed.snapshot, full=True)
        return users

    async def segment_names(self, segment_ids: Sequence[str]) -> frozenset[str]:
        """The names of these segments, as the platform last sent them (the catalog)."""
        if not segment_ids:
            return frozenset()
        async with self._sessionmaker() as session:
            labels = await session.scalars(
                select(CatalogEntry.label).where(
                    CatalogEntry.kind == "segment",
                    CatalogEntry.key.in_(list(segment_ids)),
                    CatalogEntry.label.is_not(None),
                )
            )
            return frozenset(label for label in labels if label)

    async def held_deletions(self, limit: int = 1000) -> list[dict[str, Any]]:
        """The users whose deletion a pass held, oldest first (``GET /api/deletions``)."""
        async with self._sessionmaker() as session:
            rows = await session.execute(
                select(
                    User.id,
                    User.external_id,
                    User.email,
                    User.cio_id,
                    User.skip_reason,
                    User.updated_at,
                )
                .where(sync_state.held_deletion())
                .order_by(User.updated_at, User.id)
                .limit(limit)
            )
            return [
                {
                    "id": row.id,
                    "external_id": row.external_id,
                    "email": row.email,
                    "customer_id": row.cio_id or row.external_id,
                    "reason": row.skip_reason,
                    "held_at": row.updated_at.isoformat() if row.updated_at else None,
                }
                for row in rows
            ]

    async def count_held_deletions(self) -> int:
        async with self._sessionmaker() as session:
            count = select(func.count()).where(sync_state.held_deletion())
            return await session.scalar(count) or 0

    async def confirm_deletions(self, user_ids: list[str] | None = None) -> list[str]:
        """Confirm the held deletions (``user_ids`` only, when given): the next pass sends
        them, without the deletion guard counting them; returns the users confirmed."""
        async with self._sessionmaker() as session, session.begin():
            return await sync_state.confirm_held_deletions(session, utcnow(), user_ids)

    async def _with_events(
        self, session: AsyncSession, rows: Sequence[Row[Any]]
    ) -> list[ClaimedUser]:
        """The claimed users of ``rows`` (of :data:`_SNAPSHOT_COLUMNS`), in that order, with
        their pending events: one query for all of them."""
        events: dict[str, list[PlatformEvent]] = defaultdict(list)
        found = await session.execute(
            select(*_EVENT_COLUMNS)
            .where(_events.c.user_id.in_([row.id for row in rows]), _events.c.status == "pending")
            .order_by(_events.c.occurred_at, _events.c.id)
        )
        for user_id, event_id, name, properties, context, occurred_at in found:
            events[user_id].append(
                PlatformEvent(event_id, name, properties or {}, context or {}, occurred_at)
            )
        return [
            ClaimedUser(
                snapshot=_snapshot(row, events.get(row.id, ())),
                version=row.version,
                attempts=row.attempts,
            )
            for row in rows
        ]

    async def release(self, user_ids: list[str]) -> None:
        """Give claimed users back untouched (the pass stopped before reaching them)."""
        if not user_ids:
            return
        async with self._sessionmaker() as session, session.begin():
            await session.execute(
                update(User)
                .where(User.id.in_(user_ids), User.claimed_by == self.instance_id)
                .values(claimed_by=None, claimed_until=None)
            )

    async def finish(
        self,
        claimed: ClaimedUser,
        outcome: UserOutcome,
        retry_at: datetime | None,
    ) -> None:
        """Store a user's outcome; it stays pending if it changed meanwhile or must retry.

        ``retry_at`` is when a ``retry`` outcome may be tried again.
        """
        await self.finish_many([(claimed, outcome, retry_at)])

    async def finish_many(self, items: Sequence[Finished]) -> None:
        """Store the outcomes of several users in one transaction (see :meth:`finish`).

        The columns the rules read are loaded, and the users locked, by one ``SELECT … FOR
        UPDATE``; the changes go out as one ``UPDATE`` per set of columns changed, and every
        event result, and every failed user's waiting events, as one statement each: each
        executed for many rows, with no ORM object per user. A user deleted meanwhile is
        left out.
        """
        if not items:
            return
        now = utcnow()
        async with self._sessionmaker() as session, session.begin():
            found = await session.execute(
                select(*_WRITE_BACK_READS)
                .where(_users.c.id.in_([claimed.snapshot.id for claimed, _, _ in items]))
                # One lock order for every writer, so two write-backs never deadlock.
                .order_by(_users.c.id)
                .with_for_update()
            )
            users = {row.id: _UserState(row) for row in found}
            events: list[dict[str, Any]] = []
            failed: list[dict[str, Any]] = []
            for claimed, outcome, retry_at in items:
                user = users.get(claimed.snapshot.id)
                if user is None:
                    continue
                self._write_user(user, claimed, outcome, retry_at, now)
                events.extend(
                    {
                        "b_user_id": user.id,
                        "b_event_id": event_id,
                        "b_status": status,
                        "b_reason": reason,
                        "b_sent_at": now if status == "sent" else None,
                    }
                    for event_id, (status, reason) in outcome.event_results.items()
                )
                if sync_state.is_failed_for_good(user):
                    # A user that failed for good takes its waiting events with it.
                    failed.append({"b_user_id": user.id, "b_reason": user.last_error})
            for statement, parameters in _user_updates(users.values(), now):
                await session.execute(statement, parameters)
            # Event results go first, so the failed users' rule only reaches events this pass
            # did not settle.
            if events:
                await session.execute(_EVENT_RESULT, events)
            if failed:
                await session.execute(_FAIL_PENDING_EVENTS, failed)

    def _write_user(
        self,
        user: _UserState,
        claimed: ClaimedUser,
        outcome: UserOutcome,
        retry_at: datetime | None,
        now: datetime,
    ) -> None:
        user.claimed_by = None
        user.claimed_until = None
        if outcome.status == "retry" and outcome.identified and claimed.snapshot.full:
            # A full send cut short: what it confirmed is all Customer.io is known to hold, so
            # the next pass sends the rest as changes instead of starting over (which would
            # make each pass "progress" without end).
            user.sent_attributes = dict(outcome.sent_attributes)
            if user.version == claimed.version:
                user.full_sync = False
        elif outcome.sent_attributes:
            user.sent_attributes = {**(user.sent_attributes or {}), **outcome.sent_attributes}
        if outcome.identified:
            user.cio_id = outcome.customer_id
            user.cio_synced_at = now
            if user.cio_created_at is None or user.cio_deleted_at is not None:
                user.cio_created_at = now
            user.cio_deleted_at = None
        if outcome.full_hash:
            user.cio_hash = outcome.full_hash
        if outcome.deleted:
            user.cio_deleted_at = now
            user.sent_attributes = {}
            user.cio_hash = None
        if outcome.status == "released":
            return
        user.attribute_errors = outcome.attribute_errors
        if outcome.status == "retry":
            sync_state.record_retry(
                user, attempts=outcome.attempts, reason=outcome.reason, retry_at=retry_at
            )
        else:
            sync_state.record_result(
                user,
                outcome.status,
                reason=outcome.reason,
                claimed_version=claimed.version,
                now=now,
            )

    async def start_run(self, trigger: str, full: bool, dry_run: bool) -> int:
        """Record a pass that starts now; only the newest :data:`RUNS_KEPT` runs are kept."""
        async with self._sessionmaker() as session, session.begin():
            run = SyncRun(instance=self.instance_id, trigger=trigger, full=full, dry_run=dry_run)
            session.add(run)
            await session.flush()
            oldest_kept = (
                select(SyncRun.id)
                .order_by(SyncRun.id.desc())
                .offset(RUNS_KEPT - 1)
                .limit(1)
                .scalar_subquery()
            )
            await session.execute(delete(SyncRun).where(SyncRun.id < oldest_kept))
            return run.id

    async def last_pass_finished_at(self, except_errors: Sequence[str]) -> datetime | None:
        """When the latest pass (of any instance or CLI process, not a dry run) finished with
        none of ``except_errors``."""
        async with self._sessionmaker() as session:
            return await session.scalar(
                select(func.max(SyncRun.finished_at)).where(
                    SyncRun.dry_run.is_(False),
                    or_(SyncRun.error.is_(None), SyncRun.error.not_in(except_errors)),
                )
            )

    async def finish_run(
        self,
        run_id: int,
        counts: dict[str, int | str],
        error: str | None,
        error_reasons: Sequence[str] = (),
    ) -> None:
        async with self._sessionmaker() as session, session.begin():
            await session.execute(
                update(SyncRun)
                .where(SyncRun.id == run_id)
                .values(
                    finished_at=utcnow(), error=error, error_reasons=list(error_reasons), **counts
                )
            )


class _UserState:
    """A user's sync state as the write-back reads it (:data:`_WRITE_BACK_READS`) and changes
    it: a plain object that records every assignment, so that one ``UPDATE`` for many users
    writes what changed and nothing else. Reading a column that was not read raises."""

    def __init__(self, row: Row[Any]):
        object.__setattr__(self, "changes", {})
        for name, value in row._mapping.items():
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: Any) -> None:
        self.changes[name] = value
        object.__setattr__(self, name, value)


def _user_updates(
    users: Iterable[_UserState], now: datetime
) -> list[tuple[Any, list[dict[str, Any]]]]:
    """The ``UPDATE`` statements that store ``users``' changes, each executed for many rows:
    one per set of columns changed (a pass's users share a handful)."""
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = defaultdict(list)
    for user in users:
        if user.changes:
            parameters = {f"b_{name}": value for name, value in user.changes.items()}
            groups[tuple(sorted(user.changes))].append({"b_id": user.id, **parameters})
    return [
        (
            update(_users)
            .where(_users.c.id == bindparam("b_id"))
            .values({**{name: bindparam(f"b_{name}") for name in columns}, "updated_at": now}),
            parameters,
        )
        for columns, parameters in groups.items()
    ]


def _snapshot(row: Row[Any], events: Sequence[PlatformEvent]) -> UserSnapshot:
    return UserSnapshot(
        id=row.id,
        external_id=row.external_id,
        email=row.email,
        anonymous_ids=tuple(row.anonymous_ids or ()),
        attributes=row.attributes or {},
        account=row.account or {},
        segments=tuple(row.segments or ()),
        via_batch=row.via_batch,
        full=row.full_sync,
        sent_attributes=row.sent_attributes or {},
        cio_id=row.cio_id,
        cio_created_at=row.cio_created_at,
        cio_deleted_at=row.cio_deleted_at,
        events=tuple(events),
        deletion_confirmed=sync_state.is_deletion_confirmed(row),
    )
