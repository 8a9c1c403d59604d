"""Customer.io reporting webhooks through the running service: verified, stored once, mapped
onto the right user, queryable, and never sent back to Customer.io."""

from __future__ import annotations

import asyncio
import io
import json
import sqlite3
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from sqlalchemy import select, text

from connector.db.models import WebhookDelivery
from connector.db.types import utcnow
from connector.inbound.signing import WebhookVerifier
from connector.web.keys import runtime_key

from ..conftest import ADMIN, INGEST
from ..fake_segment import WRITE_KEY as FORWARD_WRITE_KEY
from ..helpers import message, notification, webhook
from ..track_calls import operations

FIXTURES = Path(__file__).parent.parent / "fixtures"
WEBHOOK_FIXTURES = sorted(
    p.name for p in FIXTURES.glob("*.json") if p.name != "hull_notification.json"
)
SIGNING_KEY = "whsec-test-signing-key"


def fixture(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / name).read_text())


async def webhook_path(client) -> str:
    resp = await client.get("/api/webhook-url", headers=ADMIN)
    assert resp.status == 200
    url = (await resp.json())["url"]
    parts = urlsplit(url)
    return f"{parts.path}?{parts.query}"


async def post_webhook(client, path: str, payload: Any, **headers: str):
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return await client.post(
        path, data=io.BytesIO(body), headers={"Content-Type": "application/json", **headers}
    )


async def configure(client, **settings: Any) -> None:
    resp = await client.patch("/api/settings", json=settings, headers=ADMIN)
    assert resp.status == 200, await resp.text()


async def stats(client) -> dict[str, Any]:
    resp = await client.get("/api/inbound/stats", headers=ADMIN)
    assert resp.status == 200
    return await resp.json()


async def wait_processed(client, count: int) -> dict[str, Any]:
    """Stats once ``count`` deliveries have left the pending state."""
    for _ in range(100):
        current = await stats(client)
        done = sum(n for status, n in current["deliveries"].items() if status != "pending")
        if done >= count:
            return current
        await asyncio.sleep(0.05)
    raise AssertionError(f"deliveries not processed: {current}")


async def events(client, **query: str) -> dict[str, Any]:
    resp = await client.get("/api/events", params=query, headers=ADMIN)
    assert resp.status == 200, await resp.text()
    return await resp.json()


async def test_inbound_webhook_url_uses_public_url_and_a_long_token(start_app):
    client = await start_app(server={"public_url": "https://hooks.example.com/"})
    url = (await (await client.get("/api/webhook-url", headers=ADMIN)).json())["url"]
    assert url.startswith("https://hooks.example.com/webhook?conf=")
    token = parse_qs(urlsplit(url).query)["conf"][0]
    assert len(token) >= 43


async def test_inbound_rotation_stops_the_old_token_at_once(start_app):
    client = await start_app()
    old = await webhook_path(client)
    resp = await client.post("/api/webhook-url/rotate", headers=ADMIN)
    assert resp.status == 200
    new = await webhook_path(client)
    assert new != old
    assert (await post_webhook(client, old, fixture("email_sent.json"))).status == 401
    assert (await post_webhook(client, new, fixture("email_sent.json"))).status == 200


@pytest.mark.parametrize("name", WEBHOOK_FIXTURES)
async def test_inbound_every_fixture_becomes_one_tracked_event(start_app, name):
    client = await start_app()
    path = await webhook_path(client)
    payload = fixture(name)
    resp = await post_webhook(client, path, payload)
    assert resp.status == 200
    assert await resp.json() == {"ok": True}
    await wait_processed(client, 1)
    (tracked,) = (await events(client))["events"]
    assert tracked["event_id"] == payload["event_id"]
    assert tracked["user_id"] is not None
    assert tracked["context"]["source"] == "customerio"
    assert "identifiers" not in tracked["properties"]


async def test_inbound_names_properties_and_time(start_app):
    client = await start_app()
    path = await webhook_path(client)
    for name in (
        "email_clicked.json",
        "customer_preferences_changed.json",
        "legacy_email_opened.json",
    ):
        await post_webhook(client, path, fixture(name))
    await wait_processed(client, 3)
    by_name = {e["name"]: e for e in (await events(client))["events"]}
    assert set(by_name) == {
        "Email Link Clicked",
        "Customer Subscription Preferences Changed",
        "Email Opened",
    }
    assert by_name["Email Link Clicked"]["properties"]["href"] == "https://example.com/pricing"
    assert by_name["Email Link Clicked"]["occurred_at"].startswith("2020-03-26T20:25:48")
    prefs = by_name["Customer Subscription Preferences Changed"]["properties"]["content"]
    assert prefs == {"topics": {"topic_7": False, "topic_8": True}}


async def test_inbound_duplicate_event_id_is_acknowledged_and_not_stored(start_app):
    client = await start_app()
    path = await webhook_path(client)
    first = await post_webhook(client, path, fixture("email_sent.json"))
    again = await post_webhook(client, path, fixture("email_sent.json"))
    assert first.status == again.status == 200
    assert await again.json() == {"ok": True, "duplicate": True}
    current = await wait_processed(client, 1)
    assert sum(current["deliveries"].values()) == 1
    assert len((await events(client))["events"]) == 1


async def test_inbound_concurrent_duplicates_store_one_delivery(start_app):
    client = await start_app()
    path = await webhook_path(client)
    answers = await asyncio.gather(
        *(post_webhook(client, path, fixture("email_clicked.json")) for _ in range(10))
    )
    bodies = [await resp.json() for resp in answers]
    assert all(resp.status == 200 for resp in answers)
    assert sum(1 for body in bodies if not body.get("duplicate")) == 1
    current = await wait_processed(client, 1)
    assert sum(current["deliveries"].values()) == 1


async def test_inbound_event_lands_on_the_user_with_that_customer_id(start_app):
    client = await start_app()
    resp = await client.post(
        "/smart-notifier", json=notification(message("u-42", external_id="42")), headers=INGEST
    )
    assert resp.status == 200
    path = await webhook_path(client)
    await post_webhook(client, path, fixture("customer_preferences_changed.json"))
    await wait_processed(client, 1)
    user = await (await client.get("/api/users/u-42", headers=ADMIN)).json()
    assert [e["name"] for e in user["tracked_events"]] == [
        "Customer Subscription Preferences Changed"
    ]


async def test_inbound_email_fallback_finds_the_user_and_keeps_cio_id(start_app):
    client = await start_app()
    resp = await client.post(
        "/smart-notifier",
        json=notification(message("sven", external_id=None, email="sven+dt7@example.com")),
        headers=INGEST,
    )
    assert resp.status == 200
    path = await webhook_path(client)
    legacy = fixture("legacy_email_opened.json")
    legacy["data"].pop("customer_id")
    await post_webhook(client, path, legacy)
    sent = fixture("email_sent.json")
    sent["data"]["identifiers"] = {"email": "SVEN+dt7@example.com", "cio_id": "d9c106000001"}
    sent["data"].pop("customer_id")
    await post_webhook(client, path, sent)
    await wait_processed(client, 2)
    user = await (await client.get("/api/users/sven", headers=ADMIN)).json()
    assert sorted(e["name"] for e in user["tracked_events"]) == ["Email Opened", "Email Sent"]
    assert user["customerio"]["cio_id"] == "d9c106000001"


async def test_inbound_unknown_customer_creates_a_user(start_app):
    client = await start_app()
    path = await webhook_path(client)
    await post_webhook(client, path, fixture("email_sent.json"))
    await wait_processed(client, 1)
    (tracked,) = (await events(client))["events"]
    user = await (await client.get(f"/api/users/{tracked['user_id']}", headers=ADMIN)).json()
    assert user["email"] == "test@example.com"
    assert user["external_id"] == "42"
    assert user["customerio"]["cio_id"] == "d9c106000001"


async def test_inbound_event_without_identity_is_kept_and_counted(start_app):
    client = await start_app()
    path = await webhook_path(client)
    payload = {
        "event_id": "01NOIDENTITY0000000000000",
        "object_type": "webhook",
        "metric": "sent",
        "timestamp": 1613063089,
        "data": {"recipient": "https://hooks.example.com/x"},
    }
    await post_webhook(client, path, payload)
    current = await wait_processed(client, 1)
    assert current["unmatched"] == 1
    assert current["deliveries"] == {"unmatched": 1}
    (tracked,) = (await events(client))["events"]
    assert tracked["user_id"] is None
    assert tracked["name"] == "Webhook Message Sent"


async def test_inbound_unknown_object_types_and_metrics_are_acknowledged(start_app):
    client = await start_app()
    path = await webhook_path(client)
    payload = {
        "event_id": "01UNKNOWN000000000000000000",
        "object_type": "carrier_pigeon",
        "metric": "landed_safely",
        "timestamp": 1613063089,
        "data": {"customer_id": "7"},
    }
    assert (await post_webhook(client, path, payload)).status == 200
    await wait_processed(client, 1)
    (tracked,) = (await events(client))["events"]
    assert tracked["name"] == "Carrier Pigeon Landed Safely"


async def test_inbound_incoming_metrics_limit_what_becomes_an_event(start_app):
    client = await start_app()
    await configure(client, incoming_metrics=["email:opened"])
    path = await webhook_path(client)
    assert (await post_webhook(client, path, fixture("email_sent.json"))).status == 200
    assert (await post_webhook(client, path, fixture("legacy_email_opened.json"))).status == 200
    current = await wait_processed(client, 2)
    assert current["deliveries"] == {"ignored": 1, "processed": 1}
    assert [e["name"] for e in (await events(client))["events"]] == ["Email Opened"]


async def test_inbound_tracked_events_never_go_back_to_customerio(start_app, fake_cio):
    client = await start_app()
    await configure(client, events_filter=["Email Sent"])
    resp = await client.post(
        "/smart-notifier", json=notification(message("u-42", external_id="42")), headers=INGEST
    )
    assert resp.status == 200
    path = await webhook_path(client)
    await post_webhook(client, path, fixture("email_sent.json"))
    await wait_processed(client, 1)
    resp = await client.post("/api/sync?wait=1", headers=ADMIN)
    assert resp.status == 200
    # The user goes out; the event Customer.io reported does not go back to it.
    assert [call.kind for call in operations(fake_cio)] == ["identify"]


async def test_inbound_events_are_cursor_paged(start_app):
    client = await start_app()
    path = await webhook_path(client)
    for name in WEBHOOK_FIXTURES:
        await post_webhook(client, path, fixture(name))
    await wait_processed(client, len(WEBHOOK_FIXTURES))
    first = await events(client, limit="2")
    assert len(first["events"]) == 2 and first["next"]
    seen = [e["event_id"] for e in first["events"]]
    cursor = first["next"]
    while cursor:
        page = await events(client, limit="2", after=str(cursor))
        seen += [e["event_id"] for e in page["events"]]
        cursor = page["next"]
    assert sorted(seen) == sorted(fixture(name)["event_id"] for name in WEBHOOK_FIXTURES)
    user_id = first["events"][0]["user_id"]
    only = await events(client, user_id=user_id)
    assert {e["user_id"] for e in only["events"]} == {user_id}


def signed_headers(body: bytes, timestamp: int | None = None) -> dict[str, str]:
    timestamp = int(time.time()) if timestamp is None else timestamp
    signature = WebhookVerifier(SIGNING_KEY).sign(timestamp, body)
    return {"X-CIO-Signature": signature, "X-CIO-Timestamp": str(timestamp)}


async def test_inbound_signed_webhook_is_accepted_and_stored_as_it_came(start_app):
    client = await start_app()
    await configure(client, webhook_signing_key=SIGNING_KEY)
    path = await webhook_path(client)
    body = json.dumps(fixture("email_sent.json")).encode()
    headers = signed_headers(body)
    before = utcnow()
    resp = await post_webhook(client, path, body, **headers, **{"User-Agent": "Customer.io"})
    assert resp.status == 200
    assert await resp.json() == {"ok": True}
    async with client.app[runtime_key].sessionmaker() as session:
        delivery = (await session.scalars(select(WebhookDelivery))).one()
    assert delivery.event_id == fixture("email_sent.json")["event_id"]
    assert delivery.body == body.decode()
    kept = {**headers, "Content-Type": "application/json", "User-Agent": "Customer.io"}
    assert delivery.headers == kept
    assert before <= delivery.received_at <= utcnow()


@pytest.mark.parametrize(
    "tamper",
    ["unsigned", "wrong_signature", "stale", "future", "tampered_body"],
)
async def test_inbound_bad_signatures_are_refused_and_not_stored(start_app, tamper):
    client = await start_app()
    await configure(client, webhook_signing_key=SIGNING_KEY)
    path = await webhook_path(client)
    body = json.dumps(fixture("email_sent.json")).encode()
    headers = signed_headers(body)
    if tamper == "unsigned":
        headers = {}
    elif tamper == "wrong_signature":
        headers["X-CIO-Signature"] = "0" * 64
    elif tamper == "stale":
        headers = signed_headers(body, int(time.time()) - 301)
    elif tamper == "future":
        headers = signed_headers(body, int(time.time()) + 301)
    elif tamper == "tampered_body":
        body = body.replace(b"Thanks", b"Spoofs")
    resp = await post_webhook(client, path, body, **headers)
    assert resp.status == 401
    assert "error" in await resp.json()
    assert (await stats(client))["deliveries"] == {}


@pytest.mark.parametrize(
    ("case", "status"),
    [
        ("malformed", 400),
        ("array", 400),
        ("string", 400),
        ("no_token", 401),
        ("wrong_token", 401),
        ("too_large", 413),
    ],
)
async def test_inbound_bad_requests_are_refused_and_not_stored(start_app, case, status):
    client = await start_app()
    path = await webhook_path(client)
    body: bytes = json.dumps(fixture("email_sent.json")).encode()
    if case == "malformed":
        body = b'{"event_id": '
    elif case == "array":
        body = b"[1, 2]"
    elif case == "string":
        body = b'"text"'
    elif case == "no_token":
        path = "/webhook"
    elif case == "wrong_token":
        path = "/webhook?conf=not-the-token"
    elif case == "too_large":
        body = json.dumps({"event_id": "big", "data": {"x": "y" * (1024 * 1024)}}).encode()
    resp = await post_webhook(client, path, body)
    assert resp.status == status
    assert "error" in await resp.json()
    assert (await stats(client))["deliveries"] == {}


async def test_inbound_a_body_that_comes_in_pieces_is_stored_whole(start_app):
    client = await start_app()
    path = await webhook_path(client)
    payload = fixture("email_clicked.json")
    payload["event_id"] = "in-pieces"
    payload["data"]["padding"] = "p" * 200_000
    body = json.dumps(payload).encode()

    async def pieces():
        # Chunked, with pauses: the server sees the body arrive in several reads.
        for start in range(0, len(body), 50_000):
            yield body[start : start + 50_000]
            await asyncio.sleep(0.01)

    resp = await client.post(path, data=pieces(), headers={"Content-Type": "application/json"})

    assert resp.status == 200, await resp.text()
    assert await resp.json() == {"ok": True}
    await wait_processed(client, 1)
    async with client.app[runtime_key].sessionmaker() as session:
        delivery = (await session.scalars(select(WebhookDelivery))).one()
    assert (delivery.event_id, delivery.status) == ("in-pieces", "processed")
    assert delivery.body == body.decode()


async def test_inbound_a_chunked_body_over_the_limit_is_refused(start_app):
    client = await start_app()
    path = await webhook_path(client)
    piece = b" " * (256 * 1024)

    async def pieces():
        yield b'{"event_id": "big", "data": "'
        for _ in range(5):
            yield piece
        yield b'"}'

    resp = await client.post(path, data=pieces(), headers={"Content-Type": "application/json"})

    assert resp.status == 413
    assert "limited to" in (await resp.json())["error"]
    assert (await stats(client))["deliveries"] == {}


@pytest.mark.parametrize(
    "db_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)
async def test_inbox_takes_a_new_connection_when_postgresql_drops_its_own(start_app):
    client = await start_app()
    path = await webhook_path(client)
    assert (await post_webhook(client, path, webhook("before", customer_id="c1"))).status == 200
    # Every other connection to the database ends, the inbox writer's among them.
    async with client.app[runtime_key].sessionmaker() as session:
        await session.execute(
            text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        )

    statuses = {}
    for event_id in ("after-1", "after-2", "after-3"):
        resp = await post_webhook(client, path, webhook(event_id, customer_id="c1"))
        statuses[event_id] = resp.status

    # The first meets the dead connection and is written again on a new one: no 500, after
    # which Customer.io would hold back every webhook for an hour.
    assert statuses == {"after-1": 200, "after-2": 200, "after-3": 200}
    again = await post_webhook(client, path, webhook("after-1", customer_id="c1"))
    assert (again.status, await again.json()) == (200, {"ok": True, "duplicate": True})
    assert (await wait_processed(client, 4))["deliveries"] == {"processed": 4}


# A loop that waited for the lock itself would be stuck for the whole busy timeout (30 s).
@pytest.mark.timeout(15)
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_inbox_waits_for_a_write_lock_another_process_holds_without_blocking(
    start_app, db_url
):
    client = await start_app()
    path = await webhook_path(client)
    assert (await post_webhook(client, path, webhook("first", customer_id="c1"))).status == 200
    # Another process (`serve --workers`, a CLI command) is in the middle of a write.
    other = sqlite3.connect(db_url.split(":///", 1)[1], isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        waiting = asyncio.create_task(
            post_webhook(client, path, webhook("during", customer_id="c1"))
        )
        await asyncio.sleep(0.3)
        # The webhook waits for the lock, off the event loop: the service still answers.
        assert not waiting.done()
        assert (await client.get("/healthz")).status == 200
        assert not waiting.done()
    finally:
        other.execute("ROLLBACK")
        other.close()
    resp = await waiting
    assert (resp.status, await resp.json()) == (200, {"ok": True})
    again = await post_webhook(client, path, webhook("during", customer_id="c1"))
    assert await again.json() == {"ok": True, "duplicate": True}
    assert (await wait_processed(client, 2))["deliveries"] == {"processed": 2}


async def test_inbound_other_methods_get_405(start_app):
    client = await start_app()
    path = await webhook_path(client)
    for method in ("GET", "PUT", "DELETE"):
        resp = await client.request(method, path)
        assert resp.status == 405
        assert "error" in await resp.json()
    # Only POST /webhook itself takes the webhook lane; a path beside it is the app's 404.
    token = path.partition("?")[2]
    resp = await client.post(f"/webhook/?{token}", data=b"{}")
    assert resp.status == 404
    assert "error" in await resp.json()


async def test_inbound_events_are_forwarded_to_a_segment_destination(start_app, fake_segment):
    client = await start_app()
    await configure(
        client,
        forward_url=fake_segment.url,
        forward_write_key=FORWARD_WRITE_KEY,
        forward_event_prefix="customerio:",
    )
    path = await webhook_path(client)
    await post_webhook(client, path, fixture("email_clicked.json"))
    for _ in range(100):
        if fake_segment.messages():
            break
        await asyncio.sleep(0.05)
    (call,) = fake_segment.messages()
    assert call["type"] == "track"
    assert call["event"] == "customerio:Email Link Clicked"
    assert call["messageId"] == "01E4C8BES5XT87ZWRJFTB35YJ3"
    assert call["userId"] == "1"
    assert call["properties"]["href"] == "https://example.com/pricing"
    assert call["context"]["integration"] == {"name": "customerio"}
    assert call["timestamp"] == "2020-03-26T20:25:48Z"


async def test_inbound_refused_write_key_keeps_events_and_shows_on_status(start_app, fake_segment):
    client = await start_app()
    await configure(client, forward_url=fake_segment.url, forward_write_key="not-the-key")
    path = await webhook_path(client)
    await post_webhook(client, path, fixture("email_clicked.json"))
    status: dict[str, Any] = {}
    for _ in range(100):
        status = await (await client.get("/status")).json()
        if status["status"] == "error":
            break
        await asyncio.sleep(0.05)
    assert any("Forwarding is failing: HTTP 401" in m for m in status["messages"])
    assert "not-the-key" not in json.dumps(status)
    assert fake_segment.messages() == []
