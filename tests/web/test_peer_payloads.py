"""Payloads nobody on this project wrote (Customer.io's webhook spec, RudderStack's and Hull's
test data, Hull's own notification; see tests/fixtures/peers/), sent as they are and broken the
way a bad client would break them: nothing is refused that Customer.io could send, nothing
stalls, and a notification with unstorable text loses only the message that holds it."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from ..conftest import ADMIN, INGEST
from ..inbound.test_service import stats, webhook_path
from .test_bad_input import post_raw, raw

PEERS = Path(__file__).parent.parent / "fixtures" / "peers"


def _peer_webhooks() -> list[tuple[str, dict[str, Any]]]:
    corpus = PEERS / "webhooks"
    openapi = json.loads((corpus / "customerio_openapi.json").read_text())["items"]
    rudderstack = json.loads((corpus / "rudderstack.json").read_text())["cases"]
    hull = json.loads((corpus / "hull_customerio.json").read_text())["items"]
    bodies = []
    for item in [*openapi, *rudderstack, *hull]:
        body = json.loads(item["body"])
        # Several peers reuse one event_id for different events.
        body["event_id"] = f"{body.get('event_id')}-{item['id']}"
        bodies.append((item["id"], body))
    return bodies


PEER_WEBHOOKS = _peer_webhooks()
BREAKAGES = {"surrogate": "\ud800", "nul": "\x00"}


def broken(value: Any, bad: str) -> Any:
    """``value`` with ``bad`` put into every text but the event id (keys included)."""
    if isinstance(value, str):
        return value[:1] + bad + value[1:]
    if isinstance(value, list):
        return [broken(item, bad) for item in value]
    if isinstance(value, dict):
        return {
            (key if key == "event_id" else broken(key, bad)): (
                item if key == "event_id" else broken(item, bad)
            )
            for key, item in value.items()
        }
    return value


async def settle(client, count: int) -> dict[str, int]:
    """Delivery counts by status once ``count`` deliveries are no longer pending."""
    for _ in range(200):
        deliveries = (await stats(client))["deliveries"]
        if sum(n for status, n in deliveries.items() if status != "pending") >= count:
            return deliveries
        await asyncio.sleep(0.05)
    raise AssertionError(f"deliveries still pending: {deliveries}")


async def test_peer_webhooks_are_all_stored_and_processed(start_app):
    client = await start_app()
    path = await webhook_path(client)

    answers = [await post_raw(client, path, raw(body)) for _, body in PEER_WEBHOOKS]

    assert [a.status for a in answers] == [200] * len(PEER_WEBHOOKS)
    deliveries = await settle(client, len(PEER_WEBHOOKS))
    assert set(deliveries) <= {"processed", "unmatched"}
    assert sum(deliveries.values()) == len(PEER_WEBHOOKS)


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
async def test_peer_webhooks_with_unstorable_text_are_still_tracked(start_app, breakage):
    client = await start_app()
    path = await webhook_path(client)
    bodies = [broken(body, BREAKAGES[breakage]) for _, body in PEER_WEBHOOKS]

    answers = await asyncio.gather(*(post_raw(client, path, raw(body)) for body in bodies))

    assert [a.status for a in answers] == [200] * len(bodies)
    deliveries = await settle(client, len(bodies))
    assert set(deliveries) <= {"processed", "unmatched", "ignored"}, deliveries
    resp = await client.get("/api/events", params={"limit": "500"}, headers=ADMIN)
    tracked = (await resp.json())["events"]
    assert len(tracked) == len(bodies)
    assert not any(BREAKAGES[breakage] in json.dumps(e, ensure_ascii=False) for e in tracked)


async def test_hull_notification_is_stored_and_a_broken_copy_rejects_only_its_message(start_app):
    client = await start_app()
    hull = json.loads((PEERS / "hull" / "user-update-withevent.json").read_text())
    [original] = hull["messages"]
    good = {**original, "user": {**original["user"], "id": "peer-good"}}
    bad = {**original, "user": {**original["user"], "id": "peer-bad"}}
    bad["user"]["traits_intercom/pseudonym"] = "Rose\ud800"

    resp = await post_raw(client, "/smart-notifier", raw({**hull, "messages": [bad, good]}), INGEST)

    assert resp.status == 200
    body = await resp.json()
    assert body["accepted"] == 1
    assert body["rejected"] == [
        {
            "index": 0,
            "error": "user.traits_intercom/pseudonym: text holds a lone UTF-16 surrogate "
            "(not valid Unicode)",
        }
    ]
    assert (await client.get("/api/users/peer-good", headers=ADMIN)).status == 200
    assert (await client.get("/api/users/peer-bad", headers=ADMIN)).status == 404
