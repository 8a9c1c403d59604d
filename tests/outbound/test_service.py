"""Outbound sync through the running service: notifications in, Track API calls out.

Each test talks to the app over HTTP and looks at what the fake Customer.io received and at
what ``GET /api/users/{id}`` reports. The scheduler is off (``sync.scheduled = false``) unless a
test is about it; passes are started with ``POST /api/sync?wait=1``.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update
from sqlalchemy.exc import DBAPIError

from connector.db.models import User
from connector.rules.delivery import THROTTLE_RESENDS
from connector.web.keys import runtime_key

from ..conftest import ADMIN, INGEST
from ..helpers import event, message, notification
from ..track_calls import identify_bodies, operations, requests_made

FIXTURES = Path(__file__).parent.parent / "fixtures"
HULL = json.loads((FIXTURES / "hull_notification.json").read_text())


async def configure(client, **settings: Any) -> None:
    resp = await client.patch("/api/settings", json=settings, headers=ADMIN)
    assert resp.status == 200, await resp.text()


async def notify(client, *messages: dict[str, Any], route: str = "/smart-notifier") -> dict:
    resp = await client.post(route, json=notification(*messages), headers=INGEST)
    assert resp.status == 200, await resp.text()
    return await resp.json()


async def sync(client) -> dict[str, Any]:
    resp = await client.post("/api/sync?wait=1", headers=ADMIN)
    assert resp.status == 200, await resp.text()
    return await resp.json()


async def get_user(client, user_id: str) -> dict[str, Any]:
    resp = await client.get(f"/api/users/{user_id}", headers=ADMIN)
    assert resp.status == 200, await resp.text()
    return await resp.json()


async def test_outbound_insert_sends_mapped_attributes_and_records_write_back(start_app, fake_cio):
    client = await start_app()
    await configure(
        client,
        synchronized_attributes=[
            "first_name",
            "traits_salesforce_lead/title",
            "account.clearbit/name",
            "plan_started_at",
            "id",
        ],
    )
    resp = await client.post("/smart-notifier", json=HULL, headers=INGEST)
    assert await resp.json() == {"accepted": 1, "rejected": [], "flow_control": {"type": "next"}}
    await sync(client)

    (body,) = identify_bodies(fake_cio, "u-42")
    assert body == {
        "email": "ana@example.com",
        "created_at": 1522420682,
        "hull_segments": ["Paying customers"],
        "anonymous_id": "anon-7",
        "first_name": "Ana",
        "salesforce_lead-title": "CTO",
        "account_clearbit-name": "Acme",
        "plan_started_at": 1522540800,
        "hull_id": "5a1f00000000000000000001",
    }
    user = await get_user(client, "5a1f00000000000000000001")
    assert user["sync"]["status"] == "synced"
    assert user["sync"]["pending"] is False
    assert user["customerio"]["id"] == "u-42"
    assert user["customerio"]["created_at"] and user["customerio"]["synced_at"]
    assert user["customerio"]["hash"]
    assert user["customerio"]["deleted_at"] is None


async def test_outbound_update_sends_only_changed_attributes(start_app, fake_cio):
    client = await start_app()
    await configure(client, synchronized_attributes=["first_name", "plan"])
    await notify(client, message(first_name="Ana", plan="free"))
    await sync(client)
    await notify(client, message(first_name="Ana", plan="pro"))
    await sync(client)

    bodies = identify_bodies(fake_cio, "ext-1")
    assert len(bodies) == 2
    assert bodies[1] == {"plan": "pro"}
    assert fake_cio.customers["ext-1"]["plan"] == "pro"
    assert fake_cio.customers["ext-1"]["first_name"] == "Ana"


async def test_outbound_no_change_makes_no_call(start_app, fake_cio):
    client = await start_app()
    await configure(client, synchronized_attributes=["first_name"])
    await notify(client, message(first_name="Ana"))
    await sync(client)
    # The same user again, with only an event nobody whitelisted: pending, but nothing to send.
    await notify(client, message(first_name="Ana", events=[event("e-9", "Not Whitelisted")]))
    await sync(client)

    assert len(fake_cio.requests) == 1
    user = await get_user(client, "u1")
    assert user["sync"]["status"] == "skipped"
    assert user["sync"]["skip_reason"] == "no changes"
    assert user["events"][0]["status"] == "skipped"
    assert "events_filter" in user["events"][0]["reason"]


async def test_outbound_unchanged_notification_does_not_mark_pending(start_app, fake_cio):
    client = await start_app()
    await notify(client, message())
    await sync(client)
    await notify(client, message())
    user = await get_user(client, "u1")
    assert user["sync"]["pending"] is False


async def chunked_calls(start_app, fake_cio, transport: str, count: int) -> list[dict[str, Any]]:
    client = await start_app()
    names = [f"attr_{i:03d}" for i in range(count)]
    await configure(client, synchronized_attributes=names)
    await notify(client, message(**{name: f"value {name}" for name in names}))
    await sync(client)
    bodies = identify_bodies(fake_cio, "ext-1")
    stored = fake_cio.customers["ext-1"]
    assert all(stored[name] == f"value {name}" for name in names)
    assert all(len(body) <= 30 for body in bodies)
    assert "email" in bodies[0] and "created_at" in bodies[0]
    # Batch: the user's identify operations travel together in one request; single: one call
    # each.
    assert requests_made(fake_cio) == (1 if transport == "batch" else len(bodies))
    return bodies


async def test_outbound_45_attributes_take_2_calls(start_app, fake_cio, transport):
    assert len(await chunked_calls(start_app, fake_cio, transport, 45)) == 2


async def test_outbound_315_attributes_take_11_calls(start_app, fake_cio, transport):
    assert len(await chunked_calls(start_app, fake_cio, transport, 315)) == 11


async def test_outbound_user_outside_whitelisted_segments_is_skipped(start_app, fake_cio):
    client = await start_app()
    await notify(client, message(segments=("seg-other",)))
    await sync(client)
    assert fake_cio.requests == []
    user = await get_user(client, "u1")
    assert user["sync"]["status"] == "skipped"
    assert "segment" in user["sync"]["skip_reason"]


async def test_outbound_batch_bypasses_the_segment_filter(start_app, fake_cio):
    client = await start_app()
    await notify(client, message(segments=("seg-other",)), route="/batch")
    await sync(client)
    assert len(identify_bodies(fake_cio, "ext-1")) == 1


async def test_outbound_user_leaving_every_segment_is_deleted_once(start_app, fake_cio):
    client = await start_app()
    await configure(client, enable_user_deletion=True, synchronized_attributes=["plan"])
    await notify(client, message(plan="pro"))
    await sync(client)
    await notify(client, message(segments=(), plan="pro"))
    await sync(client)

    assert [c.customer_id for c in operations(fake_cio, "delete")] == ["ext-1"]
    user = await get_user(client, "u1")
    assert user["sync"]["status"] == "deleted"
    assert user["customerio"]["deleted_at"]

    # Already deleted: a further change outside the segments makes no call.
    await notify(client, message(segments=(), plan="enterprise"))
    await sync(client)
    assert len(operations(fake_cio, "delete")) == 1
    user = await get_user(client, "u1")
    assert user["sync"]["status"] == "skipped"
    assert "already deleted" in user["sync"]["skip_reason"]


async def test_outbound_deletion_off_leaves_the_customer(start_app, fake_cio):
    client = await start_app()
    await notify(client, message())
    await sync(client)
    await notify(client, message(segments=()))
    await sync(client)
    assert operations(fake_cio, "delete") == []


async def test_outbound_sends_whitelisted_events_after_identify(start_app, fake_cio, transport):
    client = await start_app()
    await configure(client, events_filter=["Signed Up"])
    events = [
        event("ev-1", "Signed Up", properties={"plan": "pro"}),
        event("ev-2", "Viewed Pricing"),
    ]
    await notify(client, message(events=events))
    await sync(client)

    asked = [(c.kind, c.customer_id) for c in operations(fake_cio)]
    assert asked == [("identify", "ext-1"), ("event", "ext-1")]
    # Batch: the identify and its event in one request; single: a call each.
    assert requests_made(fake_cio) == (1 if transport == "batch" else 2)
    sent = operations(fake_cio)[1].body
    assert sent["name"] == "Signed Up"
    assert sent["data"] == {"plan": "pro"}
    assert sent["timestamp"] == 1522420682
    assert len(sent["id"]) == 26
    user = await get_user(client, "u1")
    outcomes = {e["event_id"]: (e["status"], e["reason"]) for e in user["events"]}
    assert outcomes["ev-1"] == ("sent", None)
    assert outcomes["ev-2"][0] == "skipped"


async def test_outbound_event_ids_are_stable_across_resends(start_app, fake_cio, transport):
    client = await start_app()
    await configure(client, events_filter=["Signed Up"])
    await notify(client, message(events=[event("ev-1", "Signed Up")]))
    if transport == "batch":
        fake_cio.fail_next(503, path="/api/v2/batch")
    else:
        # The event's call only; the identify (a PUT) goes through.
        fake_cio.fail_next(503, method="POST")
    await sync(client)
    await asyncio.sleep(0.1)
    await sync(client)
    calls = operations(fake_cio, "event", "ext-1")
    assert [c.status for c in calls] == [503, 200]
    ids = [c.body["id"] for c in calls]
    assert len(ids) == 2 and ids[0] == ids[1]


async def test_outbound_page_views_use_url_and_referrer_with_fallbacks(start_app, fake_cio):
    client = await start_app()
    await configure(client, events_filter=["page"])
    events = [
        event(
            "p-1",
            "page",
            properties={"url": "https://example.com/a", "referrer": "https://google.com/"},
        ),
        event(
            "p-2",
            "page",
            created_at="2018-03-30 14:40:00 UTC",
            context={"page_url": "https://example.com/b", "referrer_url": "https://bing.com/"},
        ),
    ]
    await notify(client, message(events=events))
    await sync(client)

    pages = [c.body for c in operations(fake_cio, "page", "ext-1")]
    assert [(p["type"], p["name"], p["data"]["referrer"]) for p in pages] == [
        ("page", "https://example.com/a", "https://google.com/"),
        ("page", "https://example.com/b", "https://bing.com/"),
    ]


async def test_outbound_anonymous_events_go_out_without_a_customer_id(start_app, fake_cio):
    client = await start_app()
    await configure(client, events_filter=["Signed Up", "page"], anonymous_events=True)
    events = [
        event("ev-1", "Signed Up"),
        event("p-1", "page", properties={"url": "https://example.com/x"}),
    ]
    await notify(
        client,
        message(
            external_id=None,
            segments=("seg-other",),
            anonymous_ids=["anon-1", "anon-2"],
            events=events,
        ),
    )
    await sync(client)

    bodies = [r.body for r in fake_cio.requests_for("POST", "/api/v1/events")]
    assert [(b["anonymous_id"], b["name"], b.get("type")) for b in bodies] == [
        ("anon-2", "Signed Up", None),
        ("anon-2", "https://example.com/x", "page"),
    ]
    assert operations(fake_cio, "identify") == []


async def test_outbound_user_without_customer_id_is_skipped(start_app, fake_cio):
    client = await start_app()
    await configure(client, events_filter=["Signed Up"])
    await notify(client, message(external_id=None, events=[event("ev-1", "Signed Up")]))
    await sync(client)
    assert fake_cio.requests == []
    user = await get_user(client, "u1")
    assert "no customer id" in user["sync"]["skip_reason"]
    assert user["events"][0]["status"] == "skipped"


async def test_outbound_user_id_mapping_picks_the_customer_id(start_app, fake_cio):
    client = await start_app()
    await configure(client, user_id_mapping="email")
    await notify(client, message())
    await sync(client)
    assert len(identify_bodies(fake_cio, "ana@example.com")) == 1


async def test_outbound_over_limit_attribute_is_left_out_with_reason(start_app, fake_cio):
    client = await start_app()
    await configure(client, synchronized_attributes=["bio", "first_name"])
    await notify(client, message(bio="x" * 1001, first_name="Ana"))
    await sync(client)

    (body,) = identify_bodies(fake_cio, "ext-1")
    assert "bio" not in body and body["first_name"] == "Ana"
    user = await get_user(client, "u1")
    assert "1000" in user["sync"]["attribute_errors"]["bio"]
    assert user["sync"]["status"] == "synced"


async def test_outbound_429_beyond_the_resends_is_retried_on_a_later_pass(start_app, fake_cio):
    client = await start_app(sync={"max_attempts": 1})
    await notify(client, message())
    fake_cio.fail_next(429, times=THROTTLE_RESENDS + 1)
    await sync(client)
    user = await get_user(client, "u1")
    assert user["sync"]["status"] == "retrying"
    # Backpressure, not a failure: no attempt counted, so even max_attempts = 1 is not used up.
    assert user["sync"]["attempts"] == 0
    assert "429" in user["customerio"]["last_error"]
    assert "ext-1" not in fake_cio.customers

    await asyncio.sleep(0.1)
    await sync(client)
    assert [c.status for c in operations(fake_cio, "identify", "ext-1")] == [429] * (
        THROTTLE_RESENDS + 1
    ) + [200]
    user = await get_user(client, "u1")
    assert user["sync"]["status"] == "synced"
    assert user["sync"]["attempts"] == 0


async def test_outbound_500_until_max_attempts_fails_for_good(start_app, fake_cio):
    client = await start_app(sync={"max_attempts": 3})
    await configure(client, events_filter=["Signed Up"])
    await notify(client, message(events=[event("ev-1", "Signed Up")]))
    fake_cio.fail_next(500, times=100)
    for _ in range(5):
        await sync(client)
        await asyncio.sleep(0.1)

    assert len(fake_cio.requests) == 3
    user = await get_user(client, "u1")
    assert user["sync"]["status"] == "failed"
    assert user["sync"]["pending"] is False
    assert "500" in user["customerio"]["last_error"]
    assert user["events"][0]["status"] == "failed"
    status = await (await client.get("/status")).json()
    assert status["status"] == "error"


async def test_outbound_400_fails_at_once_with_the_reason(start_app, fake_cio):
    client = await start_app()
    await notify(client, message())
    fake_cio.fail_next(400, body={"meta": {"error": "bad attribute"}})
    await sync(client)
    assert len(fake_cio.requests) == 1
    user = await get_user(client, "u1")
    assert user["sync"]["status"] == "failed"
    assert "400" in user["customerio"]["last_error"]
    assert "bad attribute" in user["customerio"]["last_error"]


async def test_outbound_401_stops_the_pass_and_sets_the_status(start_app, fake_cio):
    client = await start_app(sync={"concurrency": 1})
    await configure(client, api_key="wrong-key")
    await notify(client, *(message(f"u{i}", external_id=f"ext-{i}") for i in range(5)))
    summary = await sync(client)
    assert summary["error"] == "Invalid credentials"
    assert len(fake_cio.requests) == 1
    status = await (await client.get("/status")).json()
    assert status["status"] == "error"
    assert any("Invalid credentials" in m for m in status["messages"])
    user = await get_user(client, "u0")
    assert user["sync"]["pending"] is True

    await configure(client, api_key=fake_cio.api_key)
    await sync(client)
    assert len(fake_cio.customers) == 5
    status = await (await client.get("/status")).json()
    assert status["status"] == "ok"


async def test_outbound_missing_credentials_sends_nothing(start_app, fake_cio):
    client = await start_app()
    await configure(client, site_id="", api_key="")
    await notify(client, message())
    summary = await sync(client)
    assert "not set" in summary["error"]
    assert fake_cio.requests == []
    assert (await get_user(client, "u1"))["sync"]["pending"] is True
    status = await (await client.get("/status")).json()
    assert status["status"] == "warning"


async def test_outbound_notification_triggers_a_pass_within_a_second(start_app, fake_cio):
    client = await start_app(sync={"scheduled": True, "interval_seconds": 3600})
    await notify(client, message())
    for _ in range(40):
        if fake_cio.requests:
            break
        await asyncio.sleep(0.05)
    assert len(identify_bodies(fake_cio, "ext-1")) == 1


async def test_outbound_mapping_change_resends_users(start_app, fake_cio):
    client = await start_app()
    await notify(client, message(segments=("seg-trial",)))
    await sync(client)
    assert fake_cio.requests == []
    await configure(client, synchronized_segments=["seg-trial"])
    await sync(client)
    assert len(identify_bodies(fake_cio, "ext-1")) == 1


async def test_catalog_lists_what_the_platform_sent(start_app):
    client = await start_app()
    resp = await client.post("/smart-notifier", json=HULL, headers=INGEST)
    assert resp.status == 200
    await notify(client, message("u2", segments=("seg-trial",), events=[event("e", "Upgraded")]))
    catalog = await (await client.get("/api/catalog", headers=ADMIN)).json()
    assert catalog["segments"] == [
        {"id": "seg-paying", "name": "Paying customers"},
        {"id": "seg-trial", "name": "Trial"},
    ]
    assert {"first_name", "salesforce_lead/title", "account.clearbit/name"} <= set(
        catalog["attributes"]
    )
    assert catalog["events"] == ["Signed Up", "Upgraded", "page"]


async def test_outbound_api_sync_starts_a_pass_when_the_schedule_is_off(start_app, fake_cio):
    client = await start_app()
    await notify(client, message())
    resp = await client.post("/api/sync", headers=ADMIN)
    assert resp.status == 202
    for _ in range(40):
        if fake_cio.requests:
            break
        await asyncio.sleep(0.05)
    assert len(identify_bodies(fake_cio, "ext-1")) == 1


# -- bad stored data never stalls a pass (SPEC §12) -----------------------------------------


async def _poison(client, user_id: str, **columns: Any) -> None:
    """Overwrite a stored user's columns behind the service's back, as data stored before the
    notification checks existed would be."""
    async with client.app[runtime_key].sessionmaker() as session, session.begin():
        await session.execute(update(User).where(User.id == user_id).values(**columns))


async def test_outbound_lone_surrogate_attribute_is_left_out_and_the_user_syncs(
    start_app, fake_cio, db_url
):
    client = await start_app()
    await configure(client, synchronized_attributes=["plan", "first_name"])
    await notify(
        client,
        *(
            message(f"u{i}", external_id=f"ext-{i}", plan="pro", first_name="Ana")
            for i in range(40)
        ),
    )
    if db_url.startswith("postgresql"):
        # PostgreSQL's jsonb refuses lone surrogates: such data cannot be stored there.
        with pytest.raises(DBAPIError):
            await _poison(client, "u7", attributes={"plan": "\ud800", "first_name": "Ana"})
        return
    await _poison(client, "u7", attributes={"plan": "\ud800", "first_name": "Ana"})

    summary = await sync(client)

    assert summary["sent"] == 40 and summary["failed"] == 0 and summary["error"] is None
    assert len(fake_cio.customers) == 40
    assert fake_cio.customers["ext-7"]["first_name"] == "Ana"
    assert "plan" not in fake_cio.customers["ext-7"]
    user = await get_user(client, "u7")
    assert user["sync"]["status"] == "synced" and user["sync"]["pending"] is False
    assert "UTF-8" in user["sync"]["attribute_errors"]["plan"]


async def test_outbound_user_that_cannot_be_processed_is_quarantined_and_the_pass_goes_on(
    start_app, fake_cio
):
    client = await start_app(sync={"concurrency": 2, "claim_batch_size": 10})
    await configure(client, events_filter=["Signed Up"])
    await notify(
        client,
        *(
            message(f"u{i}", external_id=f"ext-{i}", events=[event(f"ev-{i}", "Signed Up")])
            for i in range(40)
        ),
    )
    # Segments that are not objects: planning this user raises, whatever the rules say.
    await _poison(client, "u7", segments=[["seg-paying"]])

    for _ in range(3):
        summary = await sync(client)
        assert summary["error"] is None

    assert len(fake_cio.customers) == 39 and "ext-7" not in fake_cio.customers
    assert len(fake_cio.events) == 39
    user = await get_user(client, "u7")
    assert user["sync"]["status"] == "failed"
    assert user["sync"]["pending"] is False
    assert "could not be processed" in user["customerio"]["last_error"]
    assert user["events"][0]["status"] == "failed"
    for other in ("u0", "u6", "u8", "u39"):
        assert (await get_user(client, other))["sync"]["status"] == "synced"
    status = await (await client.get("/status")).json()
    assert status["status"] == "error"
    assert any("1 user(s) failed" in m for m in status["messages"])
