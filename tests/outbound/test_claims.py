"""Several instances on one database split the pending users and never send one twice."""

from __future__ import annotations

import asyncio
from collections import Counter

from connector.notifications.parse import parse_notification
from connector.notifications.store import store_messages
from connector.runtime import open_runtime

from ..helpers import message, notification
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
