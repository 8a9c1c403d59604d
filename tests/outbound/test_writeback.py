"""The outbound write-back: users finished together share one transaction, each with its own
outcome, and a pass returns only once every outcome it counts is committed."""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import delete, select, update

from connector.db.models import User, UserEvent
from connector.db.types import utcnow
from connector.notifications.parse import parse_notification
from connector.notifications.store import store_messages
from connector.outbound.repository import UserOutcome
from connector.runtime import open_runtime

from ..helpers import event, message, notification
from ..track_calls import BATCH, operations


async def store(runtime, *messages: dict[str, Any]) -> None:
    parsed = parse_notification(notification(*messages))
    await store_messages(runtime.sessionmaker, parsed.messages, via_batch=False)


async def users_by_id(runtime) -> dict[str, User]:
    async with runtime.sessionmaker() as session:
        return {user.id: user for user in await session.scalars(select(User))}


async def events_by_id(runtime) -> dict[tuple[str, str], UserEvent]:
    async with runtime.sessionmaker() as session:
        rows = await session.scalars(select(UserEvent))
        return {(row.user_id, row.event_id): row for row in rows}


def user_message(n: int, **kwargs: Any) -> dict[str, Any]:
    return message(f"u{n}", external_id=f"ext-{n}", email=f"u{n}@example.com", **kwargs)


async def test_writeback_batch_gives_each_user_its_own_outcome(make_config, fake_cio):
    async with open_runtime(make_config()) as runtime:
        repository = runtime.sync.repository
        await store(
            runtime,
            *(
                user_message(n, plan="free", events=[event(f"e{n}-1", "A"), event(f"e{n}-2", "B")])
                for n in range(7)
            ),
        )
        claimed = {c.snapshot.id: c for c in await repository.claim(10)}
        assert len(claimed) == 7
        # Changed while being sent: a new version, and a new event nobody has sent yet.
        await store(runtime, user_message(1, plan="pro", events=[event("e1-3", "C")]))
        # Gone while being sent.
        async with runtime.sessionmaker() as session, session.begin():
            await session.execute(delete(User).where(User.id == "u6"))

        retry_at = utcnow() + timedelta(minutes=5)
        sent = {"email": "x@example.com", "plan": "free"}
        outcomes = {
            "u0": UserOutcome(
                status="synced",
                customer_id="ext-0",
                identified=True,
                sent_attributes=sent,
                full_hash="hash-0",
                event_results={"e0-1": ("sent", None), "e0-2": ("skipped", "not whitelisted")},
            ),
            "u1": UserOutcome(
                status="synced",
                customer_id="ext-1",
                identified=True,
                sent_attributes=sent,
                full_hash="hash-1",
                event_results={"e1-1": ("sent", None), "e1-2": ("sent", None)},
            ),
            "u2": UserOutcome(status="retry", customer_id="ext-2", reason="HTTP 503", attempts=1),
            "u3": UserOutcome(
                status="retry", customer_id="ext-3", reason="gave up: HTTP 500", attempts=1
            ),
            "u4": UserOutcome(
                status="failed",
                customer_id="ext-4",
                reason="identify failed: HTTP 400",
                event_results={"e4-1": ("failed", "HTTP 400: bad")},
            ),
            "u5": UserOutcome(
                status="skipped",
                reason="no changes",
                event_results={"e5-1": ("skipped", "events_filter")},
            ),
            "u6": UserOutcome(status="synced", customer_id="ext-6", identified=True),
        }
        retries = {"u2": retry_at}
        await repository.finish_many(
            [(claimed[uid], outcome, retries.get(uid)) for uid, outcome in outcomes.items()]
        )

        users = await users_by_id(runtime)
        events = await events_by_id(runtime)

    assert "u6" not in users
    assert all(user.claimed_by is None and user.claimed_until is None for user in users.values())

    u0 = users["u0"]
    assert (u0.sync_status, u0.pending, u0.attempts) == ("synced", False, 0)
    assert (u0.cio_id, u0.cio_hash, u0.sent_attributes) == ("ext-0", "hash-0", sent)
    assert u0.cio_synced_at is not None and u0.cio_created_at is not None
    assert events["u0", "e0-1"].status == "sent" and events["u0", "e0-1"].sent_at is not None
    assert (events["u0", "e0-2"].status, events["u0", "e0-2"].reason) == (
        "skipped",
        "not whitelisted",
    )

    # Changed meanwhile: what was sent is recorded, but the user stays pending for the rest.
    u1 = users["u1"]
    assert (u1.sync_status, u1.pending, u1.cio_id) == ("synced", True, "ext-1")
    assert u1.sent_attributes == sent and u1.attributes["plan"] == "pro"
    assert events["u1", "e1-1"].status == "sent" and events["u1", "e1-2"].status == "sent"
    assert events["u1", "e1-3"].status == "pending"

    u2 = users["u2"]
    assert (u2.sync_status, u2.pending, u2.attempts, u2.last_error) == (
        "retrying",
        True,
        1,
        "HTTP 503",
    )
    assert u2.next_attempt_at == retry_at
    assert {events["u2", e].status for e in ("e2-1", "e2-2")} == {"pending"}

    # A retry that gives up (no retry_at) fails the user and its waiting events.
    u3 = users["u3"]
    assert (u3.sync_status, u3.pending, u3.attempts) == ("failed", False, 1)
    assert [(events["u3", e].status, events["u3", e].reason) for e in ("e3-1", "e3-2")] == [
        ("failed", "gave up: HTTP 500"),
        ("failed", "gave up: HTTP 500"),
    ]

    # A failed user: its own event result stays, its other waiting events fail with it.
    u4 = users["u4"]
    assert (u4.sync_status, u4.pending, u4.last_error) == (
        "failed",
        False,
        "identify failed: HTTP 400",
    )
    assert (events["u4", "e4-1"].status, events["u4", "e4-1"].reason) == (
        "failed",
        "HTTP 400: bad",
    )
    assert (events["u4", "e4-2"].status, events["u4", "e4-2"].reason) == (
        "failed",
        "identify failed: HTTP 400",
    )

    u5 = users["u5"]
    assert (u5.sync_status, u5.skip_reason, u5.pending) == ("skipped", "no changes", False)
    assert (events["u5", "e5-1"].status, events["u5", "e5-1"].reason) == (
        "skipped",
        "events_filter",
    )
    assert events["u5", "e5-2"].status == "pending"


async def test_writeback_finish_stores_one_user(make_config, fake_cio):
    async with open_runtime(make_config()) as runtime:
        await store(runtime, user_message(0))
        (claimed,) = await runtime.sync.repository.claim(10)
        await runtime.sync.repository.finish(
            claimed, UserOutcome(status="synced", customer_id="ext-0", identified=True), None
        )
        user = (await users_by_id(runtime))["u0"]
    assert (user.sync_status, user.pending, user.claimed_by, user.cio_id) == (
        "synced",
        False,
        None,
        "ext-0",
    )


async def test_writeback_user_changed_while_being_sent_stays_pending(
    make_config, fake_cio, transport
):
    config = make_config(sync={"concurrency": 2}, connector={"synchronized_attributes": ["plan"]})
    async with open_runtime(config) as runtime:
        await store(runtime, *(user_message(n, plan="free") for n in range(4)))
        # The request that carries u1's identify: on batch the one of all four users.
        if transport == "batch":
            fake_cio.slow_next(0.5, path=BATCH)
        else:
            fake_cio.slow_next(0.5, method="PUT", path="/api/v1/customers/ext-1")
        running = asyncio.create_task(runtime.sync.run_once("test"))
        for _ in range(200):
            if operations(fake_cio, "identify", "ext-1"):
                break
            await asyncio.sleep(0.01)
        await store(runtime, user_message(1, plan="pro"))
        first = await running
        after_first = await users_by_id(runtime)
        second = await runtime.sync.run_once("test")
        after_second = await users_by_id(runtime)

    assert first.sent == 4
    assert after_first["u1"].pending is True
    assert after_first["u1"].sync_status == "synced"
    assert [after_first[f"u{n}"].pending for n in (0, 2, 3)] == [False, False, False]
    assert second.sent == 1
    assert after_second["u1"].pending is False
    bodies = [c.body for c in operations(fake_cio, "identify", "ext-1")]
    assert bodies[0]["plan"] == "free" and bodies[-1] == {"plan": "pro"}


async def test_writeback_pass_over_many_claims_commits_every_outcome(
    make_config, fake_cio, transport
):
    config = make_config(sync={"claim_batch_size": 4, "concurrency": 3})
    fake_cio.latency = 0.005
    async with open_runtime(config) as runtime:
        await store(runtime, *(user_message(n) for n in range(25)))
        if transport == "batch":
            fake_cio.refuse_operations(["ext-7"])
            # A 5xx is the whole request's: the first one, a claim of four users (u7 is in
            # the sixth, claims going by id).
            fake_cio.fail_next(503, path=BATCH)
        else:
            fake_cio.fail_next(400, method="PUT", path="/api/v1/customers/ext-7")
            fake_cio.fail_next(503, method="PUT", path="/api/v1/customers/ext-13")
        seen: list[str] = []
        summary = await runtime.sync.run_once(
            "test", progress=lambda plan, _outcome: seen.append(plan.user_id)
        )
        users = await users_by_id(runtime)

    retried = [c for c in operations(fake_cio, "identify") if c.status == 503]
    if transport == "batch":
        assert len(retried) == 4 and len({c.batch for c in retried}) == 1
    else:
        assert [c.customer_id for c in retried] == ["ext-13"]
    assert "ext-7" not in {c.customer_id for c in retried}
    synced = 25 - 1 - len(retried)
    assert (summary.sent, summary.failed, summary.retrying) == (synced, 1, len(retried))
    assert sorted(seen) == sorted(users)
    # Every user exactly once: those set back for a retry wait for the next pass.
    per_customer = Counter(c.customer_id for c in operations(fake_cio, "identify"))
    assert len(per_customer) == 25 and set(per_customer.values()) == {1}
    statuses = Counter(user.sync_status for user in users.values())
    assert statuses == {"synced": synced, "failed": 1, "retrying": len(retried)}
    assert users["u7"].sync_status == "failed"
    assert all(users[f"u{c.customer_id[4:]}"].sync_status == "retrying" for c in retried)
    assert all(user.claimed_by is None for user in users.values())
    assert sum(user.pending for user in users.values()) == len(retried)


async def test_writeback_401_releases_every_claimed_user(make_config, fake_cio):
    config = make_config(
        sync={"claim_batch_size": 3, "concurrency": 2}, connector={"api_key": "wrong-key"}
    )
    async with open_runtime(config) as runtime:
        await store(runtime, *(user_message(n) for n in range(10)))
        before = {uid: user.sync_status for uid, user in (await users_by_id(runtime)).items()}
        summary = await runtime.sync.run_once("test")
        users = await users_by_id(runtime)
        reclaimed = await runtime.sync.repository.claim(100)

    assert summary.error == "Invalid credentials"
    assert summary.users == 0
    assert len(fake_cio.requests) <= 2
    assert all(user.pending and user.claimed_by is None for user in users.values())
    assert all(user.attempts == 0 for user in users.values())
    assert {uid: user.sync_status for uid, user in users.items()} == before
    assert len(reclaimed) == 10


async def test_writeback_error_fails_the_pass(make_config, fake_cio, monkeypatch):
    async with open_runtime(make_config(sync={"claim_batch_size": 2})) as runtime:
        await store(runtime, *(user_message(n) for n in range(5)))

        async def broken(items: Any) -> None:
            raise RuntimeError("database gone")

        monkeypatch.setattr(runtime.sync.repository, "finish_many", broken)
        with pytest.raises(RuntimeError, match="database gone"):
            await asyncio.wait_for(runtime.sync.run_once("test"), 30)
        assert not runtime.sync.running


RETRY_AT = utcnow() + timedelta(minutes=10)
SENT_BEFORE = {"email": "old@example.com", "plan": "free"}

# One write-back group holding every kind of outcome: (user, state before the claim, outcome,
# retry_at, columns expected after it, its events' (status, reason) after it). Every user has
# the events e1 and e2 and was last sent SENT_BEFORE, with attribute errors {"x": "before"}.
GROUP_CASES: list[tuple[str, dict[str, Any], UserOutcome, Any, dict[str, Any], list[Any]]] = [
    (
        "synced",
        {},
        UserOutcome(
            status="synced",
            customer_id="ext-synced",
            identified=True,
            sent_attributes={"plan": "pro"},
            full_hash="hash-synced",
            event_results={"e1": ("sent", None), "e2": ("skipped", "not in events_filter")},
        ),
        None,
        {
            "sync_status": "synced",
            "pending": False,
            "attempts": 0,
            "cio_id": "ext-synced",
            "cio_hash": "hash-synced",
            "sent_attributes": {"email": "old@example.com", "plan": "pro"},
            "attribute_errors": {},
            "last_error": None,
        },
        [("sent", None), ("skipped", "not in events_filter")],
    ),
    (
        "changed",
        {},
        UserOutcome(
            status="synced",
            customer_id="ext-changed",
            identified=True,
            sent_attributes={"plan": "pro"},
            event_results={"e1": ("sent", None), "e2": ("sent", None)},
        ),
        None,
        {"sync_status": "synced", "pending": True, "cio_id": "ext-changed"},
        [("sent", None), ("sent", None), ("pending", None)],
    ),
    (
        "retry",
        {"attempts": 1},
        UserOutcome(status="retry", customer_id="ext-retry", reason="HTTP 503", attempts=2),
        RETRY_AT,
        {
            "sync_status": "retrying",
            "pending": True,
            "attempts": 2,
            "last_error": "HTTP 503",
            "next_attempt_at": RETRY_AT,
            "sent_attributes": SENT_BEFORE,
        },
        [("pending", None), ("pending", None)],
    ),
    (
        "gave-up",
        {},
        UserOutcome(status="retry", reason="gave up after 3 attempts: HTTP 500", attempts=3),
        None,
        {"sync_status": "failed", "pending": False, "attempts": 3},
        [("failed", "gave up after 3 attempts: HTTP 500")] * 2,
    ),
    (
        "failed",
        {},
        UserOutcome(
            status="failed",
            reason="identify failed: HTTP 400",
            attribute_errors={"y": "too long"},
            event_results={"e1": ("failed", "HTTP 400: bad")},
        ),
        None,
        {
            "sync_status": "failed",
            "pending": False,
            "last_error": "identify failed: HTTP 400",
            "attribute_errors": {"y": "too long"},
        },
        [("failed", "HTTP 400: bad"), ("failed", "identify failed: HTTP 400")],
    ),
    (
        "deleted",
        {"cio_id": "ext-deleted"},
        UserOutcome(
            status="deleted",
            customer_id="ext-deleted",
            deleted=True,
            event_results={
                "e1": ("skipped", "user deleted from Customer.io"),
                "e2": ("skipped", "user deleted from Customer.io"),
            },
        ),
        None,
        {
            "sync_status": "deleted",
            "pending": False,
            "sent_attributes": {},
            "cio_hash": None,
            "cio_id": "ext-deleted",
        },
        [("skipped", "user deleted from Customer.io")] * 2,
    ),
    (
        "held",
        {},
        UserOutcome(status="held", customer_id="ext-held", reason="deletion held: 7 planned"),
        None,
        {
            "sync_status": "held",
            "pending": False,
            "skip_reason": "deletion held: 7 planned",
            "sent_attributes": SENT_BEFORE,
            "cio_deleted_at": None,
        },
        [("pending", None), ("pending", None)],
    ),
    (
        "released",
        {"attempts": 4},
        UserOutcome(status="released", customer_id="ext-released"),
        None,
        {
            "sync_status": "pending",
            "pending": True,
            "attempts": 4,
            "attribute_errors": {"x": "before"},
            "sent_attributes": SENT_BEFORE,
        },
        [("pending", None), ("pending", None)],
    ),
    (
        "full-cut-short",
        {"full_sync": True},
        UserOutcome(
            status="retry",
            customer_id="ext-full-cut-short",
            identified=True,
            sent_attributes={"email": "new@example.com"},
            progressed=True,
            reason="HTTP 429",
            throttled=True,
        ),
        RETRY_AT,
        {
            "sync_status": "retrying",
            "pending": True,
            "full_sync": False,
            "sent_attributes": {"email": "new@example.com"},
            "cio_id": "ext-full-cut-short",
        },
        [("pending", None), ("pending", None)],
    ),
    (
        "confirmed-retry",
        {"sync_status": "confirmed"},
        UserOutcome(status="retry", customer_id="ext-confirmed-retry", reason="HTTP 502"),
        RETRY_AT,
        {"sync_status": "confirmed", "pending": True, "last_error": "HTTP 502"},
        [("pending", None), ("pending", None)],
    ),
    (
        "anonymous",
        {"external_id": None},
        UserOutcome(status="anonymous", event_results={"e1": ("sent", None), "e2": ("sent", None)}),
        None,
        {"sync_status": "anonymous", "pending": False, "cio_id": None},
        [("sent", None), ("sent", None)],
    ),
]


async def test_writeback_group_of_every_outcome_writes_each_its_own(make_config, fake_cio):
    async with open_runtime(make_config()) as runtime:
        repository = runtime.sync.repository
        await store(
            runtime,
            *(
                message(uid, external_id=f"ext-{uid}", events=[event("e1", "A"), event("e2", "B")])
                for uid, *_ in GROUP_CASES
            ),
        )
        async with runtime.sessionmaker() as session, session.begin():
            for uid, before, *_ in GROUP_CASES:
                values = {"sent_attributes": SENT_BEFORE, "attribute_errors": {"x": "before"}}
                await session.execute(update(User).where(User.id == uid).values(**values, **before))
        claimed = {c.snapshot.id: c for c in await repository.claim(100)}
        assert claimed["full-cut-short"].snapshot.full
        assert claimed["confirmed-retry"].snapshot.deletion_confirmed
        await store(
            runtime, message("changed", external_id="ext-changed", events=[event("e3", "C")])
        )
        await repository.finish_many(
            [(claimed[uid], outcome, retry_at) for uid, _, outcome, retry_at, *_ in GROUP_CASES]
        )
        users = await users_by_id(runtime)
        events = await events_by_id(runtime)

    for uid, _, _, _, expected, expected_events in GROUP_CASES:
        user = users[uid]
        assert {column: getattr(user, column) for column in expected} == expected, uid
        assert (user.claimed_by, user.claimed_until) == (None, None), uid
        found = sorted(
            (key[1], row.status, row.reason) for key, row in events.items() if key[0] == uid
        )
        assert [(status, reason) for _, status, reason in found] == expected_events, uid
    for uid in ("synced", "changed", "full-cut-short"):
        assert users[uid].cio_synced_at is not None and users[uid].cio_created_at is not None
    assert users["deleted"].cio_deleted_at is not None
    assert users["released"].cio_synced_at is None
