"""The rate limit is a ceiling for all instances together: sending instances share it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
from sqlalchemy import select

from connector.db.engine import make_engine, make_sessionmaker
from connector.db.models import SyncInstance
from connector.db.types import utcnow
from connector.notifications.parse import parse_notification
from connector.notifications.store import store_messages
from connector.outbound.instances import SendingInstances
from connector.outbound.ratelimit import TokenBucket
from connector.runtime import open_runtime

from ..helpers import message, notification
from ..track_calls import requests_made

RATE = 40
# The rate limit counts requests: one operation a batch request makes batch send as many
# requests as single, enough to measure their pace.
ONE_REQUEST_A_USER = {"batch_max_operations": 1}


@pytest.fixture
async def sessionmaker(db_url) -> AsyncIterator:
    engine = make_engine(db_url)
    try:
        yield make_sessionmaker(engine)
    finally:
        await engine.dispose()


async def _insert_stale(sessionmaker, instance_id: str = "dead-instance") -> None:
    async with sessionmaker() as session, session.begin():
        session.add(
            SyncInstance(instance_id=instance_id, heartbeat_at=utcnow() - timedelta(hours=1))
        )


async def _instance_ids(sessionmaker) -> set[str]:
    async with sessionmaker() as session:
        return set(await session.scalars(select(SyncInstance.instance_id)))


async def _store_users(runtime, count: int) -> None:
    parsed = parse_notification(
        notification(*(message(f"u{i}", external_id=f"ext-{i}") for i in range(count)))
    )
    await store_messages(runtime.sessionmaker, parsed.messages, via_batch=False)


def _combined_rate(fake_cio) -> float:
    times = sorted(r.at for r in fake_cio.requests)
    return (len(times) - 1) / (times[-1] - times[0])


async def test_rate_share_counts_fresh_heartbeats_only(sessionmaker):
    await _insert_stale(sessionmaker)
    first = SendingInstances(sessionmaker, "first")
    second = SendingInstances(sessionmaker, "second")

    assert await first.beat() == 1
    assert await second.beat() == 2
    assert await first.beat() == 2
    # The stale row never counted, and the first heartbeat deleted it.
    assert await _instance_ids(sessionmaker) == {"first", "second"}

    await second.leave()
    assert await first.beat() == 1
    await first.leave()
    assert await _instance_ids(sessionmaker) == set()


async def test_rate_share_of_a_dead_instance_comes_back(sessionmaker):
    alive = SendingInstances(sessionmaker, "alive", heartbeat_seconds=0.05)
    dead = SendingInstances(sessionmaker, "dead", heartbeat_seconds=0.05)
    assert await dead.beat() == 1
    assert await alive.beat() == 2
    # The dead one never beats again: after three periods it no longer counts.
    await asyncio.sleep(0.3)
    assert await alive.beat() == 1


async def test_rate_share_follows_instances_starting_and_stopping(sessionmaker):
    instance = SendingInstances(sessionmaker, "long-pass", heartbeat_seconds=0.05)
    other = SendingInstances(sessionmaker, "other", heartbeat_seconds=0.05)
    bucket = TokenBucket(1000)

    async def wait_for_rate(rate: float) -> None:
        async with asyncio.timeout(5):
            while bucket.rate_per_second != pytest.approx(rate):
                await asyncio.sleep(0.01)

    async with instance.sharing(bucket, RATE):
        assert bucket.rate_per_second == RATE
        await other.beat()
        await wait_for_rate(RATE / 2)
        await other.leave()
        await wait_for_rate(RATE)
    assert await _instance_ids(sessionmaker) == set()


async def test_rate_share_two_instances_keep_to_the_ceiling_together(make_config, fake_cio):
    users = 4 * RATE
    fake_cio.set_rate_limit(RATE)
    config = make_config(
        sync={
            "rate_limit_per_second": RATE,
            "concurrency": 4,
            "claim_batch_size": 10,
            **ONE_REQUEST_A_USER,
        }
    )
    async with open_runtime(config) as first, open_runtime(config) as second:
        await _store_users(first, users)
        one, two = await asyncio.gather(first.sync.run_once("test"), second.sync.run_once("test"))
        assert await _instance_ids(first.sessionmaker) == set()

    assert fake_cio.counts[429] == 0
    assert requests_made(fake_cio) == users
    assert one.sent + two.sent == users
    assert one.sent > 0 and two.sent > 0
    # Each alone would go at the full rate: together they would send twice as fast.
    assert RATE * 0.6 <= _combined_rate(fake_cio) <= RATE * 1.3


async def test_rate_share_a_single_instance_gets_the_whole_rate(make_config, fake_cio):
    users = 2 * RATE
    fake_cio.set_rate_limit(RATE)
    config = make_config(
        sync={"rate_limit_per_second": RATE, "concurrency": 4, **ONE_REQUEST_A_USER}
    )
    async with open_runtime(config) as runtime:
        # A dead instance's stale heartbeat takes no share.
        await _insert_stale(runtime.sessionmaker)
        await _store_users(runtime, users)
        summary = await runtime.sync.run_once("test")

    assert summary.sent == users
    assert requests_made(fake_cio) == users
    assert fake_cio.counts[429] == 0
    assert RATE * 0.75 <= _combined_rate(fake_cio) <= RATE * 1.1
