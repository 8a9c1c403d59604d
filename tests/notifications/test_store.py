"""Storing parsed notifications, on both databases: a chunk of messages is written set-based,
and each of its users ends up as if the messages had been stored one at a time."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select

from connector.db import sync_state
from connector.db.models import CatalogEntry, User, UserEvent
from connector.db.sync_state import SyncStatus
from connector.db.types import utcnow
from connector.notifications.parse import parse_notification
from connector.notifications.store import (
    MAX_MESSAGES_PER_TRANSACTION,
    StoreResult,
    store_messages,
)
from connector.runtime import Runtime, open_runtime

from ..helpers import event, message, notification


@pytest.fixture
async def runtime(make_config) -> AsyncIterator[Runtime]:
    async with open_runtime(make_config()) as runtime:
        yield runtime


async def store(
    runtime: Runtime, *messages: dict[str, Any], via_batch: bool = False
) -> tuple[StoreResult, list[dict[str, Any]]]:
    """Store one notification; its result and the parser's rejections."""
    parsed = parse_notification(notification(*messages))
    result = await store_messages(runtime.sessionmaker, parsed.messages, via_batch=via_batch)
    return result, parsed.rejected


async def users(runtime: Runtime) -> dict[str, User]:
    async with runtime.sessionmaker() as session:
        return {user.id: user for user in await session.scalars(select(User))}


async def event_ids(runtime: Runtime) -> dict[str, list[str]]:
    async with runtime.sessionmaker() as session:
        rows = await session.execute(select(UserEvent.user_id, UserEvent.event_id))
    found: dict[str, list[str]] = {}
    for user_id, event_id in rows:
        found.setdefault(user_id, []).append(event_id)
    return {user_id: sorted(ids) for user_id, ids in found.items()}


async def settle(runtime: Runtime, *user_ids: str, status: str = SyncStatus.SYNCED) -> None:
    """A pass dealt with the users: no longer pending."""
    async with runtime.sessionmaker() as session, session.begin():
        for user_id in user_ids:
            user = await session.get(User, user_id)
            sync_state.record_result(
                user, status, reason=None, claimed_version=user.version, now=utcnow()
            )


async def test_store_chunk_of_new_changed_unchanged_and_invalid_users_stores_each(runtime):
    await store(
        runtime,
        message("changed", external_id="e-changed", plan="free"),
        message("same", external_id="e-same", plan="free"),
        message("more-events", external_id="e-more", events=[event("ev-1", "Signed Up")]),
    )
    await settle(runtime, "changed", "same", "more-events")
    before = await users(runtime)

    result, rejected = await store(
        runtime,
        message("changed", external_id="e-changed", plan="pro"),
        message("same", external_id="e-same", plan="free"),
        {"user": {"first_name": "nobody"}},
        message(
            "more-events",
            external_id="e-more",
            events=[event("ev-1", "Signed Up"), event("ev-2", "Upgraded")],
        ),
        message("new", external_id="e-new", events=[event("ev-3", "Signed Up")]),
    )

    assert rejected == [{"index": 2, "error": "user has none of 'id', 'external_id' and 'email'"}]
    assert (result.accepted, result.changed, result.new_events) == (4, 3, 2)
    assert result.rejected == []
    after = await users(runtime)
    assert set(after) == {"changed", "same", "more-events", "new"}
    assert after["changed"].attributes["plan"] == "pro"
    assert after["changed"].data_hash != before["changed"].data_hash
    assert (after["changed"].pending, after["changed"].version) == (
        True,
        before["changed"].version + 1,
    )
    assert after["changed"].sync_status == SyncStatus.PENDING
    # Unchanged: not touched at all.
    for column in ("pending", "version", "sync_status", "updated_at", "data_hash"):
        assert getattr(after["same"], column) == getattr(before["same"], column)
    # Unchanged data but a new event: pending for the event, data as it was.
    assert (after["more-events"].pending, after["more-events"].version) == (
        True,
        before["more-events"].version + 1,
    )
    assert after["more-events"].data_hash == before["more-events"].data_hash
    new = after["new"]
    assert (new.pending, new.version, new.attempts, new.via_batch) == (True, 1, 0, False)
    assert new.sync_status == SyncStatus.PENDING
    assert new.pending_since == new.next_attempt_at
    assert (new.external_id, new.email) == ("e-new", "ana@example.com")
    assert await event_ids(runtime) == {
        "more-events": ["ev-1", "ev-2"],
        "new": ["ev-3"],
    }


async def test_store_same_notification_again_changes_nothing(runtime):
    messages = [
        message(f"u{i}", external_id=f"e{i}", events=[event(f"ev-{i}", "Signed Up")])
        for i in range(250)
    ]
    await store(runtime, *messages)
    await settle(runtime, *(f"u{i}" for i in range(250)))
    before = await users(runtime)

    result, _ = await store(runtime, *messages)

    assert (result.accepted, result.changed, result.new_events) == (250, 0, 0)
    after = await users(runtime)
    assert [(u.version, u.pending, u.updated_at) for u in after.values()] == [
        (before[u.id].version, False, before[u.id].updated_at) for u in after.values()
    ]


async def test_store_via_batch_marks_even_unchanged_users(runtime):
    await store(runtime, message("u1"))
    await settle(runtime, "u1")

    result, _ = await store(runtime, message("u1"), via_batch=True)

    assert result.changed == 1
    user = (await users(runtime))["u1"]
    assert (user.pending, user.version, user.via_batch) == (True, 2, True)


async def test_store_change_of_a_pending_user_keeps_its_place_in_the_queue(runtime):
    await store(runtime, message("u1", plan="free"))
    retry_at = utcnow() + timedelta(minutes=5)
    async with runtime.sessionmaker() as session, session.begin():
        user = await session.get(User, "u1")
        sync_state.record_retry(user, attempts=2, reason="503", retry_at=retry_at)
    before = (await users(runtime))["u1"]

    await store(runtime, message("u1", plan="pro"))

    user = (await users(runtime))["u1"]
    assert user.version == before.version + 1
    assert (user.pending, user.attempts, user.sync_status) == (True, 2, SyncStatus.RETRYING)
    assert (user.pending_since, user.next_attempt_at) == (before.pending_since, retry_at)


async def test_store_change_of_a_failed_user_makes_it_pending_again(runtime):
    await store(runtime, message("u1", plan="free"))
    async with runtime.sessionmaker() as session, session.begin():
        user = await session.get(User, "u1")
        sync_state.record_retry(user, attempts=10, reason="500", retry_at=None)
    before = (await users(runtime))["u1"]
    assert not before.pending

    await store(runtime, message("u1", plan="pro"))

    user = (await users(runtime))["u1"]
    assert (user.pending, user.attempts, user.sync_status) == (True, 0, SyncStatus.PENDING)
    assert user.pending_since > before.pending_since
    assert user.next_attempt_at == user.pending_since


@pytest.mark.parametrize(
    ("stored", "chunk", "expected"),
    [
        pytest.param(
            [message("u1", external_id="e1", plan="free")],
            [
                message("u1", external_id="e1", plan="pro"),
                {"user": {"external_id": "e1", "plan": "max"}},
            ],
            {"u1": ("e1", "max", 3)},
            id="a stored user by id, then by external_id",
        ),
        pytest.param(
            [],
            [
                message("u1", external_id="e1", plan="pro"),
                {"user": {"external_id": "e1", "plan": "max"}},
            ],
            {"u1": ("e1", "max", 2)},
            id="a new user by id, then by external_id",
        ),
        pytest.param(
            [],
            [
                message("u1", external_id=None, email="a@example.com", plan="pro"),
                {"user": {"email": "a@example.com", "plan": "max"}},
            ],
            {"u1": (None, "max", 2)},
            id="a new user by id, then by email",
        ),
        pytest.param(
            [message("u1", external_id="e1", plan="free")],
            [
                message("u1", external_id="e2", plan="free"),
                {"user": {"external_id": "e1", "plan": "max"}},
            ],
            {"u1": ("e2", "free", 2), "external_id:e1": ("e1", "max", 1)},
            id="the id's message takes the external_id away from the next",
        ),
        pytest.param(
            [message("u1", external_id="e1", plan="free")],
            [
                {"user": {"external_id": "e1", "plan": "pro"}},
                {"user": {"external_id": "e1", "email": "b@example.com", "plan": "pro"}},
            ],
            {"u1": ("e1", "pro", 2)},
            id="parsing merges the messages of one identity",
        ),
        pytest.param(
            [message("u1", external_id="e1", plan="free")],
            [message("u1", external_id="e1", plan="free"), {"user": {"id": "u2", "plan": "x"}}],
            {"u1": ("e1", "free", 1), "u2": (None, "x", 1)},
            id="an unchanged user beside a new one",
        ),
    ],
)
async def test_store_users_of_a_chunk_are_resolved_as_one_message_at_a_time(
    runtime, stored, chunk, expected
):
    """(external_id, plan, version) of each user after the chunk."""
    if stored:
        await store(runtime, *stored)
        await settle(runtime, *(m["user"]["id"] for m in stored))

    await store(runtime, *chunk)

    found = {
        user.id: (user.external_id, user.attributes.get("plan"), user.version)
        for user in (await users(runtime)).values()
    }
    assert found == expected


async def test_store_same_user_twice_in_a_chunk_counts_its_events_once(runtime):
    await store(runtime, message("u1", external_id="e1"))

    result, _ = await store(
        runtime,
        message("u1", external_id="e1", events=[event("ev-1", "A"), event("ev-1", "A")]),
        {"user": {"external_id": "e1"}, "events": [event("ev-1", "A"), event("ev-2", "B")]},
    )

    assert result.new_events == 2
    assert await event_ids(runtime) == {"u1": ["ev-1", "ev-2"]}
    user = (await users(runtime))["u1"]
    # Two messages changed it (the second has no email, so other data): two versions.
    assert user.version == 3
    assert result.changed == 2


async def test_store_large_notification_in_several_transactions_stores_every_user(runtime):
    messages = [
        message(f"u{i:04d}", external_id=f"e{i}", events=[event(f"ev-{i}", "Signed Up")])
        for i in range(1_050)
    ]

    result, _ = await store(runtime, *messages)

    assert (result.accepted, result.changed, result.new_events) == (1_050, 1_050, 1_050)
    stored = await users(runtime)
    assert len(stored) == 1_050
    assert all(user.pending and user.version == 1 for user in stored.values())


async def test_store_catalog_of_a_notification_in_several_transactions_has_all_it_held(runtime):
    first_chunk = [message(f"u{i:03d}", plan="free") for i in range(MAX_MESSAGES_PER_TRANSACTION)]
    later = {**message("late", title="CTO"), "segments": [{"id": "seg-paying", "name": "Payers"}]}
    later["events"] = [event("ev-1", "Signed Up")]

    await store(runtime, *first_chunk, later)

    async with runtime.sessionmaker() as session:
        entries = {(e.kind, e.key): e.label for e in await session.scalars(select(CatalogEntry))}
    assert entries[("segment", "seg-paying")] == "Payers"
    assert ("attribute", "plan") in entries
    assert ("attribute", "title") in entries
    assert ("event", "Signed Up") in entries
