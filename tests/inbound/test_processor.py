"""The inbound processor's set-based batches: users resolved with the precedence of one lookup
at a time, one user per new customer, tracked events and outbox rows stored once."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import func, select, update

from connector.db.models import ForwardMessage, TrackedEvent, User, WebhookDelivery
from connector.db.types import utcnow
from connector.inbound import processor as processor_module
from connector.runtime import Runtime, open_runtime

from ..helpers import webhook

OLD = datetime(2020, 1, 1, tzinfo=UTC)


@pytest.fixture
async def runtime(make_config) -> AsyncIterator[Runtime]:
    async with open_runtime(make_config()) as runtime:
        yield runtime


async def store(runtime: Runtime, *payloads: Any) -> None:
    """Deliveries as the inbox stores them (pending), in order."""
    async with runtime.sessionmaker() as session, session.begin():
        for number, payload in enumerate(payloads):
            event_id = payload.get("event_id") if isinstance(payload, dict) else None
            session.add(
                WebhookDelivery(
                    event_id=event_id or f"no-id-{number}",
                    body=json.dumps(payload),
                    headers={},
                    received_at=utcnow(),
                    status="pending",
                )
            )


async def add_user(runtime: Runtime, user_id: str, created_at: datetime = OLD, **values) -> None:
    async with runtime.sessionmaker() as session, session.begin():
        session.add(
            User(id=user_id, version=0, pending=False, attempts=0, created_at=created_at, **values)
        )


async def users(runtime: Runtime) -> dict[str, User]:
    async with runtime.sessionmaker() as session:
        return {u.id: u for u in await session.scalars(select(User))}


async def tracked(runtime: Runtime) -> dict[str, TrackedEvent]:
    async with runtime.sessionmaker() as session:
        return {e.event_id: e for e in await session.scalars(select(TrackedEvent))}


async def deliveries(runtime: Runtime) -> dict[str, WebhookDelivery]:
    async with runtime.sessionmaker() as session:
        return {d.event_id: d for d in await session.scalars(select(WebhookDelivery))}


async def count(runtime: Runtime, model: Any) -> int:
    async with runtime.sessionmaker() as session:
        return await session.scalar(select(func.count()).select_from(model))


async def test_processor_creates_one_user_for_a_new_customer_seen_several_times(runtime):
    await store(
        runtime,
        webhook("e1", customer_id="c-new"),
        webhook("e2", customer_id="c-new", email="new@example.com"),
        webhook("e3", email="NEW@example.com", metric="clicked"),
        webhook("e4", cio_id="ref-1"),
        webhook("e5", customer_id="c-new", cio_id="ref-1"),
        webhook("e6", cio_id="ref-1", metric="delivered"),
    )
    summary = await runtime.processor.process_pending()
    assert summary.processed == 6
    found = await users(runtime)
    # e4 comes before e5 teaches c-new its cio_id, so it creates a user of its own; from e5
    # on, both users have that cio_id, and the older one is taken.
    assert set(found) == {"cio:c-new", "cio:ref-1"}
    user = found["cio:c-new"]
    assert (user.cio_id, user.email, user.cio_ref) == ("c-new", "new@example.com", "ref-1")
    assert user.external_id == "c-new"
    assert user.sync_status == "inbound"
    assert found["cio:ref-1"].cio_ref == "ref-1"
    events = await tracked(runtime)
    assert {e: events[e].user_id for e in events} == {
        "e1": "cio:c-new",
        "e2": "cio:c-new",
        "e3": "cio:c-new",
        "e4": "cio:ref-1",
        "e5": "cio:c-new",
        "e6": "cio:c-new",
    }


async def test_processor_learns_cio_id_and_email_for_later_deliveries_of_the_batch(runtime):
    await add_user(runtime, "u1", external_id="c1")
    await store(
        runtime,
        webhook("e1", customer_id="c1", email="ana@example.com", cio_id="ref-1"),
        webhook("e2", email="ANA@example.com"),
        webhook("e3", cio_id="ref-1"),
        webhook("e4", customer_id="c1", email="other@example.com", cio_id="ref-2"),
    )
    await runtime.processor.process_pending()
    found = await users(runtime)
    assert set(found) == {"u1"}
    assert (found["u1"].email, found["u1"].cio_ref) == ("ana@example.com", "ref-1")
    assert {e.user_id for e in (await tracked(runtime)).values()} == {"u1"}


async def test_processor_customer_id_beats_email_and_email_is_case_insensitive(runtime):
    await add_user(runtime, "by-external", external_id="c1")
    await add_user(runtime, "by-email", email="Bo.Smith@example.com")
    await add_user(runtime, "by-cio-id", cio_id="c2")
    await add_user(runtime, "by-external-2", external_id="c2", created_at=OLD - timedelta(days=1))
    await add_user(runtime, "by-ref", cio_ref="ref-9")
    await store(
        runtime,
        webhook("e1", customer_id="c1", email="bo.smith@example.com"),
        webhook("e2", email="BO.SMITH@Example.COM"),
        webhook("e3", customer_id="c2"),
        webhook("e4", customer_id="unknown", email="bo.smith@example.com"),
        webhook("e5", email="nobody@example.com", cio_id="ref-9"),
        webhook("e6", customer_id="c1", cio_id="ref-9"),
    )
    await runtime.processor.process_pending()
    events = await tracked(runtime)
    assert {e: events[e].user_id for e in events} == {
        "e1": "by-external",
        "e2": "by-email",
        "e3": "by-cio-id",  # the id the outbound sync sent beats user_id_mapping
        "e4": "by-email",
        "e5": "by-ref",
        "e6": "by-external",
    }
    assert set(await users(runtime)) == {
        "by-external",
        "by-email",
        "by-cio-id",
        "by-external-2",
        "by-ref",
    }


async def test_processor_two_customers_sharing_an_email_stay_two_users(runtime):
    await store(
        runtime,
        webhook("e1", customer_id="c1", email="test@example.com"),
        webhook("e2", customer_id="c2", email="test@example.com"),
        webhook("e3", email="TEST@example.com"),
    )
    await runtime.processor.process_pending()
    events = await tracked(runtime)
    assert {e: events[e].user_id for e in events} == {
        "e1": "cio:c1",
        "e2": "cio:c2",
        "e3": "cio:c1",  # no customer id: the email takes the oldest user
    }
    assert {u.id: u.cio_id for u in (await users(runtime)).values()} == {
        "cio:c1": "c1",
        "cio:c2": "c2",
    }


@pytest.mark.parametrize(
    ("stored", "customer_id", "expected"),
    [
        # The email is taken only when the stored user's customer id is unknown or the same.
        ({}, "c1", "by-email"),
        ({"external_id": "c2"}, "c1", "cio:c1"),
        ({"cio_id": "c2"}, "c1", "cio:c1"),
        ({"cio_id": "c2"}, None, "by-email"),
        ({"external_id": "c1"}, "c1", "by-email"),
        ({"attributes": {"crm_id": "c2"}}, "c1", "by-email"),  # not the mapping here
    ],
)
async def test_processor_email_fallback_respects_a_known_customer_id(
    runtime, stored, customer_id, expected
):
    await add_user(runtime, "by-email", email="Shared@example.com", **stored)
    await store(runtime, webhook("e1", customer_id=customer_id, email="shared@example.com"))
    await runtime.processor.process_pending()
    assert (await tracked(runtime))["e1"].user_id == expected


async def test_processor_takes_the_oldest_user_on_a_tie(runtime):
    await add_user(runtime, "b-newer", email="tie@example.com", created_at=OLD)
    await add_user(runtime, "z-older", email="Tie@example.com", created_at=OLD - timedelta(1))
    await add_user(runtime, "a-same-time", external_id="c1", created_at=OLD)
    await add_user(runtime, "b-same-time", external_id="c1", created_at=OLD)
    await store(runtime, webhook("e1", email="tie@example.com"), webhook("e2", customer_id="c1"))
    await runtime.processor.process_pending()
    events = await tracked(runtime)
    assert (events["e1"].user_id, events["e2"].user_id) == ("z-older", "a-same-time")


@pytest.mark.parametrize("mapping", ["email", "id", "crm_id"])
async def test_processor_matches_the_customer_id_by_user_id_mapping(runtime, mapping):
    await runtime.settings.update({"user_id_mapping": mapping})
    await add_user(runtime, "by-email", email="Cust@Example.com")
    await add_user(runtime, "cust@example.com")
    await add_user(runtime, "by-attribute", attributes={"crm_id": "cust@example.com"})
    await store(
        runtime, webhook("e1", customer_id="cust@example.com"), webhook("e2", customer_id="n1")
    )
    await runtime.processor.process_pending()
    expected = {"email": "by-email", "id": "cust@example.com", "crm_id": "by-attribute"}[mapping]
    events = await tracked(runtime)
    assert events["e1"].user_id == expected
    created = (await users(runtime))["cio:n1"]
    assert created.external_id is None
    assert created.attributes == ({"crm_id": "n1"} if mapping == "crm_id" else {})
    # A second batch finds the user created by the first one.
    await store(runtime, webhook("e3", customer_id="n1"))
    await runtime.processor.process_pending()
    assert (await tracked(runtime))["e3"].user_id == "cio:n1"


async def test_processor_takes_an_unmatched_user_with_the_new_users_id(runtime):
    # Found by none of the lookups, but holding the id a new user would get.
    await add_user(runtime, "cio:c7", external_id="something-else")
    await store(runtime, webhook("e1", customer_id="c7", email="c7@example.com", cio_id="r7"))
    await runtime.processor.process_pending()
    (user,) = (await users(runtime)).values()
    assert (user.id, user.email, user.cio_ref, user.cio_id) == (
        "cio:c7",
        "c7@example.com",
        "r7",
        None,
    )
    assert (await tracked(runtime))["e1"].user_id == "cio:c7"


async def test_processor_reprocessed_delivery_adds_no_event_and_no_outbox_row(runtime):
    await runtime.settings.update({"forward_url": "http://127.0.0.1:9/v1/batch"})
    await store(runtime, webhook("e1", customer_id="c1"), webhook("e2", email="a@example.com"))
    await runtime.processor.process_pending()
    assert await count(runtime, TrackedEvent) == 2
    assert await count(runtime, ForwardMessage) == 2
    # As if the claim had expired before the outcome was stored: processed a second time.
    async with runtime.sessionmaker() as session, session.begin():
        await session.execute(
            update(WebhookDelivery).values(status="pending", claimed_until=OLD, event_name=None)
        )
    await store(runtime, webhook("e3", customer_id="c1"))
    summary = await runtime.processor.process_pending()
    assert summary.processed == 3
    assert await count(runtime, TrackedEvent) == 3
    assert await count(runtime, ForwardMessage) == 3
    assert set(await users(runtime)) == {"cio:c1", "cio:a@example.com"}
    assert {d.status for d in (await deliveries(runtime)).values()} == {"processed"}


async def test_processor_outcomes_ignored_unmatched_invalid(runtime):
    await runtime.settings.update({"incoming_metrics": ["email:opened", "webhook:sent"]})
    await store(
        runtime,
        webhook("e1", customer_id="c1"),
        webhook("e2", customer_id="c1", metric="clicked"),
        webhook("e3", object_type="webhook", metric="sent"),
        [1, 2],
        {"event_id": "", "object_type": "email", "metric": "opened"},
    )
    summary = await runtime.processor.process_pending()
    assert (summary.processed, summary.ignored, summary.unmatched, summary.invalid) == (1, 1, 1, 2)
    stored = await deliveries(runtime)
    assert {key: d.status for key, d in stored.items()} == {
        "e1": "processed",
        "e2": "ignored",
        "e3": "unmatched",
        "no-id-3": "invalid",
        "no-id-4": "invalid",
    }
    assert stored["e2"].event_name == "Email Link Clicked"
    assert stored["no-id-4"].error == "event_id must be a non-empty string"
    assert stored["no-id-3"].event_name is None
    assert all(d.processed_at is not None and d.claimed_until is None for d in stored.values())
    events = await tracked(runtime)
    assert set(events) == {"e1", "e3"}
    assert events["e3"].user_id is None
    sample = runtime.metrics.registry.get_sample_value
    assert sample("connector_webhooks_total", {"outcome": "ignored", "event": "Email Link Clicked"})
    assert sample("connector_webhooks_total", {"outcome": "invalid", "event": ""}) == 2


async def test_processor_works_in_batches(runtime, monkeypatch):
    monkeypatch.setattr(processor_module, "BATCH_SIZE", 3)
    await store(runtime, *(webhook(f"e{i}", customer_id=f"c{i % 4}") for i in range(10)))
    summary = await runtime.processor.process_pending()
    assert summary.processed == 10
    assert len(await users(runtime)) == 4


@pytest.mark.parametrize("load", [1.0, 50.0], ids=["receiving", "saturated"])
async def test_processor_gives_way_to_a_working_receiver_and_still_processes_everything(
    runtime, monkeypatch, load
):
    monkeypatch.setattr(processor_module, "BATCH_SIZE", 3)
    monkeypatch.setattr(processor_module, "MAX_GIVE_WAY_SECONDS", 0.01)
    polls = 0

    def receiver_load() -> float:
        nonlocal polls
        polls += 1
        return load

    runtime.processor.give_way_to(receiver_load)
    await store(runtime, *(webhook(f"e{i}", customer_id=f"c{i}") for i in range(10)))
    summary = await runtime.processor.process_pending()
    assert summary.processed == 10
    # Asked before every batch: three of three, then the last one.
    assert polls == 4
