"""Outbound sync under Customer.io's faults: 429 backpressure, 5xx, timeouts (some applied).

A 429 slows the pass down and is no attempt; 5xx and timeouts count against the operation that
got them, never against what already went through; under a realistic mix every user ends
``synced`` and Customer.io holds each attribute and event once.
"""

from __future__ import annotations

import asyncio

from sqlalchemy import func, select

from connector.db.models import User
from connector.web.keys import runtime_key

from ..helpers import event, message
from ..track_calls import BATCH, identify_requests, operations
from .test_service import configure, get_user, notify, sync


async def test_outbound_429_pauses_and_resends_without_counting_an_attempt(
    start_app, fake_cio, transport
):
    # One attempt allowed: only a 429 that is no attempt lets this user through.
    client = await start_app(sync={"max_attempts": 1, "backoff_max_seconds": 5})
    await configure(client, events_filter=["Signed Up"])
    await notify(client, message(events=[event("ev-1", "Signed Up")]))
    # The identify's request: on batch the one that carries the event too.
    fake_cio.fail_next(429, times=2, headers={"Retry-After": "1"}, **identify_requests(transport))

    summary = await sync(client)

    assert summary["sent"] == 1 and summary["failed"] == 0 and summary["retrying"] == 0
    puts = operations(fake_cio, "identify", "ext-1")
    assert [c.status for c in puts] == [429, 429, 200]
    # Retry-After is honoured: nothing is sent again before it has passed.
    assert puts[1].at - puts[0].at >= 0.9
    assert puts[2].at - puts[1].at >= 0.9
    assert len(fake_cio.events) == 1
    user = await get_user(client, "u1")
    assert user["sync"]["status"] == "synced"
    assert user["sync"]["attempts"] == 0


async def test_outbound_429_without_retry_after_still_backs_off_and_goes_on(start_app, fake_cio):
    client = await start_app(sync={"max_attempts": 1})
    await notify(client, *(message(f"u{i}", external_id=f"ext-{i}") for i in range(5)))
    fake_cio.fail_next(429, times=3)

    summary = await sync(client)

    assert summary["sent"] == 5 and summary["failed"] == 0
    assert sorted(fake_cio.customers) == [f"ext-{i}" for i in range(5)]


async def _fail_the_second_request_of_a_pass(client, fake_cio, status: int) -> None:
    """A pass whose first request goes through and whose next one gets ``status``.

    The first request is held a moment, and the failure scripted once it has arrived: the
    next request of a user spanning several is sent only after the previous was answered.
    """
    fake_cio.slow_next(0.2, path=BATCH)
    before = len(fake_cio.requests)
    task = asyncio.create_task(sync(client))
    for _ in range(100):
        if len(fake_cio.requests) > before:
            break
        await asyncio.sleep(0.01)
    fake_cio.fail_next(status, path=BATCH)
    await task
    assert len(fake_cio.requests) > before + 1, "the pass sent no second request"


async def test_outbound_attempts_count_per_operation_not_per_pass(start_app, fake_cio, transport):
    # Batch: one operation a request, so that the user's operations get answers of their own
    # as v1 calls do.
    client = await start_app(sync={"max_attempts": 2, "batch_max_operations": 1})
    await configure(client, events_filter=["Signed Up", "Upgraded"])
    events = [event("ev-1", "Signed Up"), event("ev-2", "Upgraded")]
    await notify(client, message(events=events))

    fake_cio.fail_next(500, **identify_requests(transport))
    await sync(client)
    user = await get_user(client, "u1")
    assert (user["sync"]["status"], user["sync"]["attempts"]) == ("retrying", 1)
    # Its events wait for the identify.
    assert operations(fake_cio, "event") == []

    # The identify goes through this time; the first event's first try fails: a new operation's
    # first attempt, not the user's second.
    await asyncio.sleep(0.1)
    if transport == "batch":
        await _fail_the_second_request_of_a_pass(client, fake_cio, 503)
    else:
        fake_cio.fail_next(503, method="POST")
        await sync(client)
    user = await get_user(client, "u1")
    assert (user["sync"]["status"], user["sync"]["attempts"]) == ("retrying", 1)

    await asyncio.sleep(0.1)
    await sync(client)
    user = await get_user(client, "u1")
    assert user["sync"]["status"] == "synced"
    assert user["sync"]["attempts"] == 0
    # The identify that succeeded was not sent again.
    assert [c.status for c in operations(fake_cio, "identify")] == [500, 200]
    assert sorted(e["name"] for e in fake_cio.events) == ["Signed Up", "Upgraded"]


async def test_outbound_timed_out_call_that_was_applied_is_resent_once(
    start_app, make_config, fake_cio
):
    client = await start_app(make_config(customerio={"timeout_seconds": 0.2}))
    await configure(client, events_filter=["Signed Up"])
    await notify(client, message(events=[event("ev-1", "Signed Up")]))
    # The fake applies a held request once the hold is over, long after the client gave up.
    fake_cio.slow_next(0.5, method="POST")

    await sync(client)
    user = await get_user(client, "u1")
    assert user["sync"]["status"] == "retrying"
    assert user["customerio"]["last_error"] == "timeout"
    await asyncio.sleep(0.6)
    await sync(client)

    user = await get_user(client, "u1")
    assert user["sync"]["status"] == "synced"
    assert len(operations(fake_cio, "event")) == 2
    # Sent twice with the same id: Customer.io keeps one.
    assert [e["name"] for e in fake_cio.events] == ["Signed Up"]


async def _statuses(client) -> dict[str, int]:
    async with client.app[runtime_key].sessionmaker() as session:
        rows = await session.execute(
            select(User.sync_status, func.count()).group_by(User.sync_status)
        )
        return dict(rows.all())


async def _pending(client) -> int:
    async with client.app[runtime_key].sessionmaker() as session:
        return await session.scalar(select(func.count()).where(User.pending.is_(True)))


async def test_outbound_every_user_syncs_under_a_fault_mix(start_app, make_config, fake_cio):
    users = 200
    config = make_config(
        customerio={"timeout_seconds": 0.2},
        # Batch: one user's three operations a request, so that the mix draws about as many
        # faults as on single and every kind of them shows up.
        sync={"concurrency": 8, "claim_batch_size": 50, "batch_max_operations": 3},
    )
    client = await start_app(config)
    await configure(client, synchronized_attributes=["plan"], events_filter=["A", "B"])
    await notify(
        client,
        *(
            message(
                f"u{n}",
                external_id=f"ext-{n}",
                plan=f"plan-{n}",
                events=[event(f"a-{n}", "A"), event(f"b-{n}", "B")],
            )
            for n in range(users)
        ),
    )
    # About 20% of calls: 429, 500, 503, held past the timeout, or held after being applied.
    fake_cio.fault_mix(0.2, seed=20240611, hold=0.5)

    for _ in range(40):
        await sync(client)
        if not await _pending(client):
            break
        await asyncio.sleep(0.06)

    assert await _statuses(client) == {"synced": users}
    assert set(fake_cio.faults) == {"429", "500", "503", "timeout", "applied_timeout"}
    assert len(fake_cio.customers) == users
    assert all(fake_cio.customers[f"ext-{n}"]["plan"] == f"plan-{n}" for n in range(users))
    # Customer.io deduplicates on the event id: every event is there, each exactly once.
    stored = sorted((e["customer_id"], e["name"]) for e in fake_cio.events)
    expected = sorted((f"ext-{n}", name) for n in range(users) for name in ("A", "B"))
    assert stored == expected
