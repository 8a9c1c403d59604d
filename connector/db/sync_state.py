"""A user's sync state, and every change of it.

A user's place in the outbound work queue is a few columns of ``users``: ``sync_status``
(one :class:`SyncStatus`), ``pending``, ``pending_since``, ``next_attempt_at``, ``attempts``,
and the reason columns. Only this module writes them; callers name the change
(:func:`mark_pending`, :func:`mark_all_pending`, :func:`record_result`, :func:`record_retry`,
:func:`retry_failed_users`, :func:`confirm_held_deletions`; :func:`first_pending_state` and
:func:`mark_pending_values` are :func:`mark_pending` for statements writing many users at
once) and read through the conditions
below. The set-based changes are one statement each, whatever the number of users.
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any, Protocol

from sqlalchemy import ColumnElement, case, false, func, literal, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from connector.db.models import User


class SyncStatus(enum.StrEnum):
    """What ``users.sync_status`` holds; the values are the strings stored and shown by the
    API (``sync.status``), so a member's value never changes."""

    NEW = "new"
    """The model's default: known but never looked at. Every path that creates a user today
    sets another status at once (``pending``, ``inbound``)."""
    PENDING = "pending"
    """Changed since the last pass (or made pending again by hand): a pass sends it."""
    INBOUND = "inbound"
    """Created from a Customer.io reporting webhook: the platform never sent it, so there is
    nothing to send until it does."""
    SYNCED = "synced"
    """The last pass sent what it had to (identify and/or events)."""
    ANONYMOUS = "anonymous"
    """The last pass sent anonymous events only: the user has no customer id."""
    SKIPPED = "skipped"
    """The last pass sent nothing, for ``skip_reason`` (not whitelisted, no changes, …)."""
    DELETED = "deleted"
    """The last pass deleted the person in Customer.io."""
    RETRYING = "retrying"
    """The last pass got a 429, a 5xx or no answer: still pending, due at
    ``next_attempt_at``, with ``attempts`` counted against the operation held up."""
    FAILED = "failed"
    """The last pass failed for the user, with ``last_error``. Not pending (and so quarantined)
    unless it changed meanwhile; :func:`retry_failed_users` makes it pending again."""
    HELD = "held"
    """The last pass planned to delete the person but held the deletion (``skip_reason``
    says why: more deletions than ``sync.max_deletions_per_pass``). Not pending: it waits for
    :func:`confirm_held_deletions`, or for a change of the user (which makes it pending and
    planned afresh)."""
    CONFIRMED = "confirmed"
    """A held deletion an admin confirmed: pending, and the next pass deletes the person
    without the deletion guard counting it (unless it came back into a segment)."""


class QueueState(Protocol):
    """The queue columns of one user as a pass's write-back changes them: a :class:`User`, or
    a plain object holding the columns the write-back read (``outbound.repository``)."""

    version: int
    pending: bool
    pending_since: datetime | None
    next_attempt_at: datetime | None
    attempts: int
    via_batch: bool
    full_sync: bool
    sync_status: str
    skip_reason: str | None
    last_error: str | None


PASS_RESULTS = frozenset(
    {
        SyncStatus.SYNCED,
        SyncStatus.ANONYMOUS,
        SyncStatus.SKIPPED,
        SyncStatus.DELETED,
        SyncStatus.FAILED,
        SyncStatus.HELD,
    }
)
"""The statuses a pass that settled a user leaves (:func:`record_result`)."""


def failed_for_good() -> ColumnElement[bool]:
    """Users quarantined: failed, and not pending again since."""
    return (User.sync_status == SyncStatus.FAILED) & User.pending.is_(False)


def is_failed_for_good(user: QueueState) -> bool:
    """:func:`failed_for_good` of a loaded user."""
    return user.sync_status == SyncStatus.FAILED and not user.pending


def has_status(value: str) -> ColumnElement[bool]:
    """Users whose status is ``value``; none when ``value`` is no :class:`SyncStatus`."""
    try:
        status = SyncStatus(value)
    except ValueError:
        return false()
    return User.sync_status == status


def held_deletion() -> ColumnElement[bool]:
    """Users whose deletion a pass held, waiting for an admin's confirmation."""
    return (User.sync_status == SyncStatus.HELD) & User.pending.is_(False)


def is_deletion_confirmed(user: QueueState) -> bool:
    """Whether an admin confirmed the deletion the last pass held for ``user``."""
    return user.sync_status == SyncStatus.CONFIRMED


def webhook_user_state() -> dict[str, Any]:
    """The sync state of a user created from webhooks (``users`` columns): known to
    Customer.io, not sent by the platform, nothing to send."""
    return {"sync_status": SyncStatus.INBOUND, "version": 0, "pending": False, "attempts": 0}


def mark_pending(user: User, now: datetime, *, via_batch: bool) -> None:
    """``user`` changed: a new version, and pending (from ``now``) unless it already was."""
    user.version = (user.version or 0) + 1
    if via_batch:
        user.via_batch = True
    if not user.pending:
        user.pending = True
        user.pending_since = now
        user.attempts = 0
        user.next_attempt_at = now
        user.sync_status = SyncStatus.PENDING


def first_pending_state(now: datetime, *, via_batch: bool) -> dict[str, Any]:
    """The sync state of a user the platform sends for the first time (``users`` columns):
    what :func:`mark_pending` makes of a new user."""
    return {
        "version": 1,
        "pending": True,
        "pending_since": now,
        "attempts": 0,
        "next_attempt_at": now,
        "sync_status": SyncStatus.PENDING,
        "via_batch": via_batch,
    }


def mark_pending_values(now: Any, *, versions: Any, via_batch: bool) -> dict[str, Any]:
    """:func:`mark_pending` as the values of an ``UPDATE`` of many users (an executemany):
    ``versions`` new versions (a number or a bind parameter), and pending from ``now`` (a
    datetime or a bind parameter) unless it already was."""
    if isinstance(now, datetime):
        now = literal(now, User.pending_since.type)
    was_pending = User.pending.is_(True)
    values: dict[str, Any] = {
        "version": User.version + versions,
        "pending": True,
        "pending_since": case((was_pending, User.pending_since), else_=now),
        "attempts": case((was_pending, User.attempts), else_=0),
        "next_attempt_at": case((was_pending, User.next_attempt_at), else_=now),
        "sync_status": case((was_pending, User.sync_status), else_=SyncStatus.PENDING.value),
    }
    if via_batch:
        values["via_batch"] = True
    return values


async def mark_all_pending(session: AsyncSession, now: datetime, *, full: bool) -> int:
    """Every user is due again now, its attempts reset (``full``: every attribute is sent
    again, not only what changed); returns how many users. Statuses are left as they are."""
    result = await session.execute(
        update(User).values(
            full_sync=True if full else User.full_sync,
            pending=True,
            version=User.version + 1,
            pending_since=func.coalesce(User.pending_since, now),
            next_attempt_at=now,
            attempts=0,
        )
    )
    return result.rowcount or 0


async def _make_pending(
    session: AsyncSession, condition: ColumnElement[bool], now: datetime, status: SyncStatus
) -> list[str]:
    """The users matching ``condition`` become pending with ``status``, due now with their
    attempts reset; returns their ids."""
    users = list(await session.scalars(select(User.id).where(condition)))
    if users:
        await session.execute(
            update(User)
            .where(User.id.in_(users))
            .values(
                pending=True,
                version=User.version + 1,
                pending_since=now,
                next_attempt_at=now,
                attempts=0,
                sync_status=status,
            )
        )
    return users


async def retry_failed_users(session: AsyncSession, now: datetime) -> list[str]:
    """Make every user :func:`failed_for_good` pending again, due now with its attempts
    reset; returns their ids."""
    return await _make_pending(session, failed_for_good(), now, SyncStatus.PENDING)


async def confirm_held_deletions(
    session: AsyncSession, now: datetime, user_ids: list[str] | None = None
) -> list[str]:
    """Confirm the deletions held (of ``user_ids`` only, when given): each user becomes
    pending, due now, and ``confirmed``; returns their ids."""
    condition = held_deletion()
    if user_ids is not None:
        condition = condition & User.id.in_(user_ids)
    return await _make_pending(session, condition, now, SyncStatus.CONFIRMED)


def record_result(
    user: QueueState, status: str, *, reason: str | None, claimed_version: int, now: datetime
) -> None:
    """A pass settled ``user`` with ``status`` (one of :data:`PASS_RESULTS`) and ``reason``
    (``skip_reason`` of a skipped user, ``last_error`` of a failed one).

    It leaves the queue unless it changed since it was claimed (``claimed_version``); a
    changed one stays pending, due now.
    """
    result = SyncStatus(status)
    if result not in PASS_RESULTS:
        raise ValueError(f"a pass does not leave a user {result.value!r}")
    user.sync_status = result
    user.skip_reason = reason if result in (SyncStatus.SKIPPED, SyncStatus.HELD) else None
    user.last_error = reason if result is SyncStatus.FAILED else None
    user.attempts = 0
    if user.version == claimed_version:
        user.pending = False
        user.pending_since = None
        user.via_batch = False
        user.full_sync = False
    user.next_attempt_at = now


def record_retry(
    user: QueueState, *, attempts: int, reason: str | None, retry_at: datetime | None
) -> None:
    """A pass must try ``user`` again at ``retry_at`` (``retrying``), or gave up on it
    (``retry_at`` None: ``failed``, and no longer pending), after ``attempts``.

    A confirmed deletion that must be tried again stays ``confirmed``, so the guard does not
    hold it a second time."""
    user.attempts = attempts
    user.last_error = reason
    if retry_at is None:
        user.pending = False
        user.sync_status = SyncStatus.FAILED
    else:
        user.next_attempt_at = retry_at
        if user.sync_status != SyncStatus.CONFIRMED:
            user.sync_status = SyncStatus.RETRYING
