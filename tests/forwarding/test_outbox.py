"""Forwarding the outbox to a Segment-compatible destination (the fake batch endpoint)."""

from __future__ import annotations

import asyncio
import socket
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import select

from connector.db.models import ForwardMessage, TrackedEvent
from connector.db.types import utcnow
from connector.forwarding.message import segment_track
from connector.forwarding.outbox import (
    MAX_BATCH_BYTES,
    ClaimedMessage,
    ForwardingService,
    SegmentClient,
    answer_excerpt,
    pack_batches,
)
from connector.rules.delivery import SendOutcome
from connector.runtime import Runtime, open_runtime

from ..fake_segment import WRITE_KEY, FakeSegment, serving

WHEN = datetime(2021, 2, 11, 17, 4, 49, tzinfo=UTC)
PREFIX = "cio: "
# Longer than the configured backoff ceiling (sync.backoff_max_seconds in conftest).
BACKOFF_WAIT = 0.1
NOTHING_DONE = {"sent": 0, "retrying": 0, "failed": 0, "batches": 0, "error": None}


@pytest.fixture
async def segment() -> AsyncIterator[FakeSegment]:
    # The same as the ``fake_segment`` plugin fixture, which conftest does not load (yet).
    async with serving() as fake:
        yield fake


@pytest.fixture
async def runtime(make_config) -> AsyncIterator[Runtime]:
    async with open_runtime(make_config()) as runtime:
        yield runtime


@asynccontextmanager
async def forwarding(runtime: Runtime, name: str = "test") -> AsyncIterator[ForwardingService]:
    service = ForwardingService(
        runtime.sessionmaker, runtime.settings, runtime.config.sync, runtime.metrics, name
    )
    try:
        yield service
    finally:
        await service.close()


async def point_at(runtime: Runtime, url: str, write_key: str = WRITE_KEY) -> None:
    await runtime.settings.update(
        {"forward_url": url, "forward_write_key": write_key, "forward_event_prefix": PREFIX}
    )


async def add_events(
    runtime: Runtime, count: int, *, properties: dict[str, Any] | None = None, start: int = 0
) -> list[dict[str, Any]]:
    """Tracked events with their outbox messages, as the inbound processor stores them;
    even ones have a customer id, odd ones only an email. Returns the payloads."""
    events = [
        TrackedEvent(
            event_id=f"evt-{i:05d}",
            name="Email Opened",
            object_type="email",
            metric="opened",
            properties=properties if properties is not None else {"subject": f"hi {i}"},
            context={"source": "customerio"},
            occurred_at=WHEN,
            customer_id=None if i % 2 else f"cust-{i}",
            email=f"user{i}@example.com",
        )
        for i in range(start, start + count)
    ]
    payloads = []
    async with runtime.sessionmaker() as session, session.begin():
        session.add_all(events)
        await session.flush()
        now = utcnow()
        for event in events:
            payload = segment_track(
                event_id=event.event_id,
                name=event.name,
                properties=event.properties,
                occurred_at=event.occurred_at,
                customer_id=event.customer_id,
                email=event.email,
                prefix=PREFIX,
            )
            payloads.append(payload)
            session.add(
                ForwardMessage(tracked_event_id=event.id, payload=payload, next_attempt_at=now)
            )
    return payloads


async def outbox_rows(runtime: Runtime) -> list[ForwardMessage]:
    async with runtime.sessionmaker() as session:
        return list(await session.scalars(select(ForwardMessage).order_by(ForwardMessage.id)))


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1/batch"


def sample(runtime: Runtime, name: str, labels: dict[str, str]) -> float | None:
    return runtime.metrics.registry.get_sample_value(name, labels)


async def test_forwarding_flush_sends_batch_and_marks_rows_sent(runtime, segment):
    await point_at(runtime, segment.url)
    payloads = await add_events(runtime, 2)

    async with forwarding(runtime) as service:
        summary = await service.flush()

    assert summary.as_dict() == {
        "sent": 2,
        "retrying": 0,
        "failed": 0,
        "batches": 1,
        "error": None,
    }
    [received] = segment.batches
    assert (received.user, received.password) == (WRITE_KEY, "")
    assert received.content_type == "application/json"
    assert received.body["batch"] == payloads
    assert received.body["sentAt"].endswith("Z")
    first, second = received.body["batch"]
    assert (first["messageId"], first["userId"], first["event"]) == (
        "evt-00000",
        "cust-0",
        "cio: Email Opened",
    )
    assert second["anonymousId"] == "user1@example.com"
    assert "userId" not in second
    rows = await outbox_rows(runtime)
    assert [(r.status, r.attempts, r.last_error) for r in rows] == [("sent", 1, None)] * 2
    assert all(r.sent_at is not None and r.claimed_until is None for r in rows)
    assert sample(runtime, "connector_forwarded_messages_total", {"outcome": "sent"}) == 2
    assert sample(runtime, "connector_forward_requests_total", {"status": "200"}) == 1
    assert sample(runtime, "connector_queue_depth", {"queue": "forward_outbox"}) == 0


async def test_forwarding_server_error_is_retried_on_the_next_flush(runtime, segment):
    await point_at(runtime, segment.url)
    await add_events(runtime, 1)
    segment.fail_next(500)

    async with forwarding(runtime) as service:
        first = await service.flush()
        [row] = await outbox_rows(runtime)
        # The retry waits for a later flush, even once it is due.
        assert len(segment.batches) == 1
        await asyncio.sleep(BACKOFF_WAIT)
        second = await service.flush()

    assert (first.retrying, first.sent, first.error) == (
        1,
        0,
        'HTTP 500: {"success": false, "message": "injected failure 500"}',
    )
    assert (row.status, row.attempts, row.last_error) == ("pending", 1, first.error)
    assert row.next_attempt_at > row.created_at
    assert (second.sent, second.retrying) == (1, 0)
    [row] = await outbox_rows(runtime)
    assert (row.status, row.attempts, row.last_error) == ("sent", 2, None)
    assert [b.status for b in segment.batches] == [500, 200]


async def test_forwarding_gives_up_after_max_attempts(make_config, segment):
    async with open_runtime(make_config(sync={"max_attempts": 3})) as runtime:
        await point_at(runtime, segment.url)
        await add_events(runtime, 1)
        segment.fail_next(503, times=10)
        outcomes = []
        async with forwarding(runtime) as service:
            for _ in range(4):
                summary = await service.flush()
                outcomes.append((summary.retrying, summary.failed))
                await asyncio.sleep(BACKOFF_WAIT)
        [row] = await outbox_rows(runtime)

    assert outcomes == [(1, 0), (1, 0), (0, 1), (0, 0)]
    assert len(segment.batches) == 3
    assert (row.status, row.attempts) == ("failed", 3)
    assert row.last_error.startswith("gave up after 3 attempts: HTTP 503: ")


@pytest.mark.parametrize("status", [400, 404, 413])
async def test_forwarding_client_error_fails_at_once_with_the_reason(runtime, segment, status):
    await point_at(runtime, segment.url)
    await add_events(runtime, 2)
    # The batch of two, then each of its halves.
    segment.fail_next(
        status, times=3, body={"success": False, "message": "Track event is missing name"}
    )

    async with forwarding(runtime) as service:
        summary = await service.flush()

    assert (summary.failed, summary.retrying, summary.sent) == (2, 0, 0)
    assert len(segment.batches) == 3
    reason = f'HTTP {status}: {{"success": false, "message": "Track event is missing name"}}'
    rows = await outbox_rows(runtime)
    assert [(r.status, r.attempts, r.last_error) for r in rows] == [("failed", 1, reason)] * 2
    assert sample(runtime, "connector_forwarded_messages_total", {"outcome": "failed"}) == 2


async def test_forwarding_refused_batch_is_split_until_the_bad_call_fails_alone(runtime, segment):
    await point_at(runtime, segment.url)
    await add_events(runtime, 10)
    async with runtime.sessionmaker() as session, session.begin():
        row = (await session.scalars(select(ForwardMessage).offset(6).limit(1))).one()
        row.payload = {key: value for key, value in row.payload.items() if key != "event"}

    async with forwarding(runtime) as service:
        summary = await service.flush()

    assert (summary.sent, summary.failed, summary.retrying) == (9, 1, 0)
    rows = await outbox_rows(runtime)
    [failed] = [r for r in rows if r.status == "failed"]
    assert failed.id == rows[6].id
    assert (
        failed.last_error
        == 'HTTP 400: {"success": false, "message": "Track event is missing name"}'
    )
    # 1 + 2 + 2 + 2 + 2 requests at most for 10 calls: halves, not one request per call.
    assert len(segment.batches) <= 9
    assert sorted(m["messageId"] for m in segment.messages()) == sorted(
        f"evt-{i:05d}" for i in range(10) if i != 6
    )


async def test_forwarding_wrong_write_key_keeps_messages_and_stops_the_flush(runtime, segment):
    await point_at(runtime, segment.url, write_key="wrong-key")
    await add_events(runtime, 150)

    async with forwarding(runtime) as service:
        summary = await service.flush()

    rows = await outbox_rows(runtime)
    assert (summary.failed, summary.sent) == (0, 0)
    assert len(segment.batches) == 1
    assert {(r.status, r.attempts) for r in rows} == {("pending", 0)}
    refused = [r for r in rows if r.last_error]
    assert len(refused) == 100
    assert refused[0].last_error == 'HTTP 401: {"success": false, "message": "invalid write key"}'
    assert segment.batches[0].user == "wrong-key"


async def test_forwarding_403_is_a_refused_write_key_too(runtime, segment):
    await point_at(runtime, segment.url)
    await add_events(runtime, 1)
    segment.fail_next(403, body={"success": False, "message": "forbidden"})

    async with forwarding(runtime) as service:
        summary = await service.flush()

    [row] = await outbox_rows(runtime)
    assert (summary.failed, row.status, row.attempts) == (0, "pending", 0)
    assert row.last_error.startswith("HTTP 403")


async def test_forwarding_reason_never_carries_the_write_key(runtime, segment):
    await point_at(runtime, segment.url)
    await add_events(runtime, 1)
    segment.fail_next(400, body=f"unknown source {WRITE_KEY}\nsee docs")

    async with forwarding(runtime) as service:
        await service.flush()

    [row] = await outbox_rows(runtime)
    assert row.last_error == "HTTP 400: unknown source [redacted] see docs"


async def test_forwarding_connection_refused_is_retried(runtime):
    await point_at(runtime, closed_port_url())
    await add_events(runtime, 3)

    async with forwarding(runtime) as service:
        summary = await service.flush()

    assert (summary.retrying, summary.failed, summary.batches) == (3, 0, 1)
    rows = await outbox_rows(runtime)
    assert {(r.status, r.attempts) for r in rows} == {("pending", 1)}
    assert rows[0].last_error == "connection error (ClientConnectorError)"
    assert sample(runtime, "connector_forward_requests_total", {"status": "0"}) == 1


async def test_forwarding_without_url_keeps_rows_pending_until_one_is_set(runtime, segment):
    await add_events(runtime, 2)

    async with forwarding(runtime) as service:
        idle = await service.flush()
        rows = await outbox_rows(runtime)
        depth = sample(runtime, "connector_queue_depth", {"queue": "forward_outbox"})
        await point_at(runtime, segment.url)
        busy = await service.flush()

    assert idle.as_dict() == NOTHING_DONE
    assert [(r.status, r.attempts, r.claimed_until) for r in rows] == [("pending", 0, None)] * 2
    assert depth == 2
    assert busy.sent == 2
    assert len(segment.messages()) == 2


async def test_forwarding_batches_hold_at_most_100_calls(runtime, segment):
    await point_at(runtime, segment.url)
    await add_events(runtime, 250)

    async with forwarding(runtime) as service:
        summary = await service.flush()

    assert [len(b.body["batch"]) for b in segment.batches] == [100, 100, 50]
    assert (summary.sent, summary.batches) == (250, 3)
    ids = [call["messageId"] for call in segment.messages()]
    assert len(set(ids)) == 250
    assert {r.status for r in await outbox_rows(runtime)} == {"sent"}


async def test_forwarding_batches_are_capped_by_size(runtime, segment):
    await point_at(runtime, segment.url)
    await add_events(runtime, 40, properties={"content": "x" * 20_000})
    await add_events(runtime, 1, properties={"content": "y" * 40_000}, start=40)

    async with forwarding(runtime) as service:
        summary = await service.flush()

    assert (summary.sent, summary.failed) == (40, 1)
    assert len(segment.batches) == 2
    assert all(b.status == 200 for b in segment.batches)
    rows = await outbox_rows(runtime)
    assert rows[-1].status == "failed"
    assert rows[-1].last_error == "message larger than the 32 KB a call may have"


async def test_forwarding_stops_the_flush_when_the_destination_is_down(runtime, segment):
    await point_at(runtime, segment.url)
    await add_events(runtime, 150)
    segment.fail_next(503)

    async with forwarding(runtime) as service:
        first = await service.flush()
        rows = await outbox_rows(runtime)
        await asyncio.sleep(BACKOFF_WAIT)
        second = await service.flush()

    assert (first.retrying, first.batches) == (100, 1)
    assert Counter(r.attempts for r in rows) == {1: 100, 0: 50}
    assert all(r.status == "pending" and r.claimed_until is None for r in rows)
    assert (second.sent, second.batches) == (150, 2)


async def test_forwarding_two_instances_never_send_a_message_twice(make_config, segment):
    segment.latency = 0.01
    config = make_config()
    async with open_runtime(config) as first, open_runtime(config) as second:
        await point_at(first, segment.url)
        await add_events(first, 450)
        async with forwarding(first, "one") as one, forwarding(second, "two") as two:
            results = await asyncio.gather(one.flush(), two.flush())

    per_message = Counter(call["messageId"] for call in segment.messages())
    assert len(per_message) == 450
    assert set(per_message.values()) == {1}
    assert sum(r.sent for r in results) == 450
    assert all(r.sent > 0 for r in results)


async def test_segment_client_timeout_is_a_retry(segment):
    segment.latency = 0.5
    client = SegmentClient(timeout_seconds=0.05)
    try:
        result = await client.send_batch(segment.url, WRITE_KEY, b'{"batch":[]}')
    finally:
        await client.close()
    assert (result.outcome, result.status, result.reason) == (SendOutcome.RETRY, None, "timeout")


def claimed(size: int, id_: int = 0) -> ClaimedMessage:
    return ClaimedMessage(id=id_, attempts=0, encoded=b"x" * size, lease=WHEN)


@pytest.mark.parametrize(
    ("sizes", "max_count", "max_bytes", "expected"),
    [
        ([], 100, MAX_BATCH_BYTES, []),
        ([10] * 5, 2, MAX_BATCH_BYTES, [2, 2, 1]),
        # Separators count: 3 calls of 10 bytes take 32.
        ([10, 10, 10], 100, 32, [3]),
        ([10, 10, 10], 100, 31, [2, 1]),
        ([40, 5, 5], 100, 30, [1, 2]),
        ([5, 40, 5], 100, 30, [1, 1, 1]),
    ],
)
def test_pack_batches_caps_count_and_bytes(sizes, max_count, max_bytes, expected):
    messages = [claimed(size, i) for i, size in enumerate(sizes)]
    batches = pack_batches(messages, max_count, max_bytes)
    assert [len(batch) for batch in batches] == expected
    assert [m.id for batch in batches for m in batch] == list(range(len(sizes)))


def test_answer_excerpt_is_short_single_line_and_without_the_key():
    basic = "d3JpdGUta2V5Og=="  # base64 of "write-key:"
    text = f"key write-key\r\nauth {basic}\t" + "z" * 500
    excerpt = answer_excerpt(text.encode(), "write-key")
    assert excerpt.startswith("key [redacted] auth [redacted] zzz")
    assert len(excerpt) == 200
    assert excerpt.endswith("…")
