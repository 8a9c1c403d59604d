"""The webhook inbox's group commits: what they tell the processor about the receiver's load."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import func, select

from connector.db.models import WebhookDelivery
from connector.inbound.processor import SATURATED_GROUP_SIZE
from connector.runtime import Runtime, open_runtime

BODY = '{"event_id": "e"}'


@pytest.fixture
async def runtime(make_config) -> AsyncIterator[Runtime]:
    async with open_runtime(make_config()) as runtime:
        runtime.inbox.start()
        yield runtime
        await runtime.inbox.close()


async def stored(runtime: Runtime) -> int:
    async with runtime.sessionmaker() as session:
        return await session.scalar(select(func.count()).select_from(WebhookDelivery))


async def test_inbox_load_is_light_when_webhooks_only_waited_for_another_transaction(runtime):
    # A transaction of processing has the database (on SQLite, the process's one connection)
    # while webhooks arrive one at a time: they queue, and are then committed together.
    async with runtime.sessionmaker() as session, session.begin():
        await session.execute(select(WebhookDelivery.id).limit(1))
        arriving = []
        for n in range(30):
            arriving.append(asyncio.create_task(runtime.inbox.store(f"e{n}", BODY, {})))
            await asyncio.sleep(0.001)
    assert all(await asyncio.gather(*arriving))
    assert await stored(runtime) == 30
    # They queued behind that transaction, not behind the inbox's own commits: the receiver is
    # not saturated, and processing must not give way as if it were.
    assert runtime.inbox.load < SATURATED_GROUP_SIZE


async def test_inbox_load_is_heavy_while_webhooks_queue_for_its_commits(runtime):
    for burst in range(10):
        stores = [runtime.inbox.store(f"b{burst}-{n}", BODY, {}) for n in range(40)]
        assert all(await asyncio.gather(*stores))
    assert await stored(runtime) == 400
    assert runtime.inbox.load >= SATURATED_GROUP_SIZE
