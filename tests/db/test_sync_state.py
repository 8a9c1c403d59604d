"""A user's sync state: the statuses and the strings they store, and each named change of it,
on both databases."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import func, select, text

from connector.db import sync_state
from connector.db.models import User
from connector.db.sync_state import PASS_RESULTS, SyncStatus
from connector.db.types import utcnow
from connector.notifications.parse import parse_notification
from connector.notifications.store import store_messages
from connector.runtime import open_runtime

from ..helpers import message, notification

STORED = [
    (SyncStatus.NEW, "new"),
    (SyncStatus.PENDING, "pending"),
    (SyncStatus.INBOUND, "inbound"),
    (SyncStatus.SYNCED, "synced"),
    (SyncStatus.ANONYMOUS, "anonymous"),
    (SyncStatus.SKIPPED, "skipped"),
    (SyncStatus.DELETED, "deleted"),
    (SyncStatus.RETRYING, "retrying"),
    (SyncStatus.FAILED, "failed"),
    (SyncStatus.HELD, "held"),
    (SyncStatus.CONFIRMED, "confirmed"),
]


@pytest.mark.parametrize(("status", "stored"), STORED)
def test_sync_status_is_the_string_stored_and_shown(status: SyncStatus, stored: str):
    assert status == stored
    assert SyncStatus(stored) is status
    assert str(status) == stored
    assert json.dumps({"status": status}) == json.dumps({"status": stored})


def test_sync_status_has_exactly_the_known_members():
    assert [status for status, _ in STORED] == list(SyncStatus)


def test_sync_status_model_default_is_new():
    assert User.__table__.c.sync_status.default.arg == SyncStatus.NEW


def test_sync_status_pass_results_are_the_settled_statuses():
    assert {"synced", "anonymous", "skipped", "deleted", "failed", "held"} == PASS_RESULTS


@pytest.mark.parametrize("status", ["new", "pending", "inbound", "retrying", "sent", ""])
def test_sync_state_record_result_refuses_what_no_pass_leaves(status: str):
    user = User(id="u1", version=1, pending=True, attempts=2, sync_status="pending")
    with pytest.raises(ValueError):
        sync_state.record_result(user, status, reason=None, claimed_version=1, now=utcnow())
    assert (user.sync_status, user.pending, user.attempts) == ("pending", True, 2)


async def store(runtime, *user_ids: str, **attributes: Any) -> None:
    messages = [
        message(user_id, external_id=f"ext-{user_id}", email=f"{user_id}@example.com", **attributes)
        for user_id in user_ids
    ]
    parsed = parse_notification(notification(*messages))
    await store_messages(runtime.sessionmaker, parsed.messages, via_batch=False)


async def stored_statuses(runtime) -> dict[str, str]:
    """``users.sync_status`` as the database returns it, no ORM in between."""
    async with runtime.sessionmaker() as session:
        rows = (await session.execute(text("SELECT id, sync_status FROM users"))).all()
    assert all(type(status) is str for _, status in rows)
    return dict(rows)


async def users_by_id(runtime) -> dict[str, User]:
    async with runtime.sessionmaker() as session:
        return {user.id: user for user in await session.scalars(select(User))}


async def settle(
    runtime, user_id: str, status: str, reason: str | None = None, *, changed: bool = False
) -> None:
    """End ``user_id``'s pass with ``status`` (``retrying``, or a pass result); ``changed``:
    the user changed while the pass was sending it."""
    async with runtime.sessionmaker() as session, session.begin():
        user = await session.get(User, user_id)
        claimed_version = user.version
        if changed:
            sync_state.mark_pending(user, utcnow(), via_batch=False)
        if status == SyncStatus.RETRYING:
            retry_at = utcnow() + timedelta(minutes=5)
            sync_state.record_retry(user, attempts=1, reason=reason, retry_at=retry_at)
        else:
            sync_state.record_result(
                user, status, reason=reason, claimed_version=claimed_version, now=utcnow()
            )


async def count_failed_for_good(runtime) -> int:
    async with runtime.sessionmaker() as session:
        return await session.scalar(select(func.count()).where(sync_state.failed_for_good()))


async def test_sync_state_mark_pending_stores_pending_once(make_config):
    async with open_runtime(make_config()) as runtime:
        await store(runtime, "u1", plan="free")
        first = (await users_by_id(runtime))["u1"]
        await store(runtime, "u1", plan="pro")
        second = (await users_by_id(runtime))["u1"]
        statuses = await stored_statuses(runtime)

    assert statuses == {"u1": "pending"}
    assert (first.pending, first.version, first.attempts) == (True, 1, 0)
    assert first.next_attempt_at == first.pending_since
    # Pending already: a new version, the same place in the queue.
    assert (second.pending, second.version) == (True, 2)
    assert second.pending_since == first.pending_since


@pytest.mark.parametrize(
    ("status", "skip_reason", "last_error"),
    [
        ("synced", None, None),
        ("anonymous", None, None),
        ("deleted", None, None),
        ("skipped", "why", None),
        ("failed", None, "why"),
    ],
)
async def test_sync_state_record_result_takes_the_user_out_of_the_queue(
    make_config, status, skip_reason, last_error
):
    async with open_runtime(make_config()) as runtime:
        await store(runtime, "u1")
        await settle(runtime, "u1", status, reason="why")
        user = (await users_by_id(runtime))["u1"]
        statuses = await stored_statuses(runtime)
        failed = await count_failed_for_good(runtime)

    assert statuses == {"u1": status}
    assert (user.pending, user.pending_since, user.attempts) == (False, None, 0)
    assert (user.skip_reason, user.last_error) == (skip_reason, last_error)
    assert failed == (1 if status == "failed" else 0)


async def test_sync_state_record_result_of_a_changed_user_keeps_it_pending(make_config):
    async with open_runtime(make_config()) as runtime:
        await store(runtime, "u1", plan="free")
        since = (await users_by_id(runtime))["u1"].pending_since
        await settle(runtime, "u1", "failed", reason="HTTP 400", changed=True)
        user = (await users_by_id(runtime))["u1"]
        failed = await count_failed_for_good(runtime)

    assert (user.sync_status, user.pending, user.pending_since) == ("failed", True, since)
    assert failed == 0


async def test_sync_state_record_retry_keeps_pending_or_gives_up(make_config):
    retry_at = utcnow() + timedelta(minutes=5)
    async with open_runtime(make_config()) as runtime:
        await store(runtime, "u1", "u2")
        async with runtime.sessionmaker() as session, session.begin():
            u1, u2 = await session.get(User, "u1"), await session.get(User, "u2")
            sync_state.record_retry(u1, attempts=2, reason="HTTP 503", retry_at=retry_at)
            sync_state.record_retry(u2, attempts=3, reason="gave up", retry_at=None)
        users = await users_by_id(runtime)
        statuses = await stored_statuses(runtime)
        failed = await count_failed_for_good(runtime)

    assert statuses == {"u1": "retrying", "u2": "failed"}
    u1, u2 = users["u1"], users["u2"]
    assert (u1.pending, u1.attempts, u1.last_error, u1.next_attempt_at) == (
        True,
        2,
        "HTTP 503",
        retry_at,
    )
    assert (u2.pending, u2.attempts, u2.last_error) == (False, 3, "gave up")
    assert failed == 1


async def test_sync_state_mark_all_pending_keeps_every_status(make_config):
    async with open_runtime(make_config()) as runtime:
        await store(runtime, "u1", "u2", "u3", "u4")
        await settle(runtime, "u1", "synced")
        await settle(runtime, "u2", "failed", reason="HTTP 400")
        await settle(runtime, "u3", "retrying", reason="HTTP 503")
        before = await users_by_id(runtime)
        async with runtime.sessionmaker() as session, session.begin():
            now = utcnow()
            marked = await sync_state.mark_all_pending(session, now, full=False)
        changes = await users_by_id(runtime)
        async with runtime.sessionmaker() as session, session.begin():
            await sync_state.mark_all_pending(session, utcnow(), full=True)
        full = await users_by_id(runtime)
        statuses = await stored_statuses(runtime)

    assert marked == 4
    assert statuses == {"u1": "synced", "u2": "failed", "u3": "retrying", "u4": "pending"}
    for user_id, user in changes.items():
        assert (user.pending, user.attempts, user.next_attempt_at) == (True, 0, now)
        assert user.version == before[user_id].version + 1
        assert user.full_sync is False
    # A user pending already keeps its place in the queue.
    assert changes["u4"].pending_since == before["u4"].pending_since
    assert changes["u1"].pending_since == now
    assert all(user.full_sync for user in full.values())


async def test_sync_state_retry_failed_users_takes_only_the_quarantined(make_config):
    async with open_runtime(make_config()) as runtime:
        await store(runtime, "u1", "u2", "u3")
        await settle(runtime, "u1", "failed", reason="HTTP 400")
        # Changed while the pass was sending it: failed, and pending still.
        await settle(runtime, "u2", "failed", reason="HTTP 400", changed=True)
        await settle(runtime, "u3", "synced")
        before = await users_by_id(runtime)
        held = await count_failed_for_good(runtime)
        async with runtime.sessionmaker() as session, session.begin():
            now = utcnow()
            retried = await sync_state.retry_failed_users(session, now)
        after = await users_by_id(runtime)
        statuses = await stored_statuses(runtime)
        held_after = await count_failed_for_good(runtime)
        async with runtime.sessionmaker() as session, session.begin():
            again = await sync_state.retry_failed_users(session, utcnow())

    assert (held, retried, held_after, again) == (1, ["u1"], 0, [])
    assert statuses == {"u1": "pending", "u2": "failed", "u3": "synced"}
    u1 = after["u1"]
    assert (u1.pending, u1.attempts, u1.pending_since, u1.next_attempt_at) == (True, 0, now, now)
    assert u1.version == before["u1"].version + 1
    assert after["u2"].version == before["u2"].version
    assert after["u3"].pending is False


async def test_sync_state_has_status_filters_users(make_config):
    async with open_runtime(make_config()) as runtime:
        await store(runtime, "u1", "u2", "u3")
        await settle(runtime, "u1", "synced")
        await settle(runtime, "u2", "skipped", reason="no changes")
        found: dict[str, list[str]] = {}
        async with runtime.sessionmaker() as session:
            for value in ("synced", "skipped", "pending", "failed", "bogus", "SYNCED"):
                query = select(User.id).where(sync_state.has_status(value)).order_by(User.id)
                found[value] = list(await session.scalars(query))

    assert found == {
        "synced": ["u1"],
        "skipped": ["u2"],
        "pending": ["u3"],
        "failed": [],
        "bogus": [],
        "SYNCED": [],
    }
