"""Several instances on one database split the pending users and never send one twice."""

from __future__ import annotations

import asyncio
from collections import Counter

from sqlalchemy import update

from connector.db.models import UserEvent
from connector.notifications.parse import parse_notification
from connector.notifications.store import store_messages
from connector.runtime import open_runtime

from ..helpers import event, message, notification
from ..track_calls import operations

USERS = 120


async def test_claims_two_instances_send_each_user_exactly_once(make_config, fake_cio, transport):
    config = make_config(sync={"claim_batch_size": 10, "concurrency": 4})
    # Long enough for the two passes to overlap: batch makes one request per claim of ten
    # users, single ten.
    fake_cio.latency = 0.05 if transport == "batch" else 0.005
    async with open_runtime(config) as first, open_runtime(config) as second:
        assert first.engine is not second.engine
        parsed = parse_notification(
            notification(*(message(f"u{i}", external_id=f"ext-{i}") for i in range(USERS)))
        )
        await store_messages(first.sessionmaker, parsed.messages, via_batch=False)

        one, two = await asyncio.gather(first.sync.run_once("test"), second.sync.run_once("test"))

    per_customer = Counter(call.customer_id for call in operations(fake_cio, "identify"))
    assert len(per_customer) == USERS
    assert set(per_customer.values()) == {1}
    assert one.sent + two.sent == USERS
    assert one.sent > 0 and two.sent > 0


async def test_claims_expired_lease_is_taken_over(make_config, fake_cio):
    config = make_config(sync={"lease_seconds": 1})
    async with open_runtime(config) as crashed, open_runtime(config) as survivor:
        parsed = parse_notification(notification(message()))
        await store_messages(crashed.sessionmaker, parsed.messages, via_batch=False)
        # The first instance claims the user and dies before sending anything.
        assert len(await crashed.sync.repository.claim(10)) == 1
        assert (await survivor.sync.run_once("test")).sent == 0
        await asyncio.sleep(1.1)
        assert (await survivor.sync.run_once("test")).sent == 1
    assert len(operations(fake_cio, "identify")) == 1


async def test_claims_never_exceed_the_batch_size(make_config, fake_cio):
    config = make_config()
    async with open_runtime(config) as runtime:
        parsed = parse_notification(
            notification(*(message(f"u{i}", external_id=f"ext-{i}") for i in range(300)))
        )
        await store_messages(runtime.sessionmaker, parsed.messages, via_batch=False)
        sizes = []
        while batch := await runtime.sync.repository.claim(100):
            sizes.append(len(batch))
    assert sizes == [100, 100, 100]


async def test_claims_made_at_once_by_two_instances_are_disjoint(make_config, fake_cio):
    config = make_config()
    async with open_runtime(config) as first, open_runtime(config) as second:
        parsed = parse_notification(
            notification(*(message(f"u{i}", external_id=f"ext-{i}") for i in range(USERS)))
        )
        await store_messages(first.sessionmaker, parsed.messages, via_batch=False)
        repositories = [first.sync.repository, second.sync.repository] * 3
        batches = await asyncio.gather(*(repository.claim(20) for repository in repositories))

    taken = Counter(claimed.snapshot.id for batch in batches for claimed in batch)
    assert [len(batch) for batch in batches] == [20] * 6
    assert len(taken) == USERS and set(taken.values()) == {1}


async def test_claims_load_what_a_peek_shows_in_queue_order_with_pending_events(
    make_config, fake_cio
):
    async with open_runtime(make_config()) as runtime:
        repository = runtime.sync.repository
        for i in (3, 1, 2):
            events = [event(f"e{i}-b", "B", "2024-01-02 00:00:00 UTC"), event(f"e{i}-a", "A")]
            parsed = parse_notification(
                notification(message(f"u{i}", external_id=f"ext-{i}", plan=i, events=events))
            )
            await store_messages(runtime.sessionmaker, parsed.messages, via_batch=False)
        async with runtime.sessionmaker() as session, session.begin():
            await session.execute(
                update(UserEvent).where(UserEvent.event_id == "e2-a").values(status="sent")
            )
        peeked = await repository.peek(10)
        claimed = await repository.claim(10)

    assert [c.snapshot for c in claimed] == [c.snapshot for c in peeked]
    assert [(c.version, c.attempts) for c in claimed] == [(c.version, c.attempts) for c in peeked]
    assert [c.snapshot.id for c in claimed] == ["u3", "u1", "u2"]
    events = {c.snapshot.id: [e.event_id for e in c.snapshot.events] for c in claimed}
    assert events == {"u3": ["e3-a", "e3-b"], "u1": ["e1-a", "e1-b"], "u2": ["e2-b"]}
    u1 = claimed[1].snapshot
    assert (u1.external_id, u1.attributes["plan"], u1.segments) == (
        "ext-1",
        1,
        ({"id": "seg-paying", "name": "Paying"},),
    )
