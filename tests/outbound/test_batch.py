"""The batch transport through HTTP against the running service: many users per
``/api/v2/batch`` request, and what each of Customer.io's answers does to each operation."""

from __future__ import annotations

import asyncio
import json
import math
import re
import signal
import sys
from pathlib import Path

import pytest

from ..conftest import ADMIN, ADMIN_PASSWORD, INGEST_TOKEN
from ..helpers import event, message
from ..test_cli import run_cli, write_toml
from ..track_calls import BATCH, accepted, identify_bodies, operations, requests_made
from ..web.test_admin import logged_in, page_html
from .test_service import configure, get_user, notify, sync

USERS = 30


@pytest.fixture
def transport() -> str:
    return "batch"


def users_with_events(count: int = USERS) -> list[dict]:
    return [
        message(
            f"u{i}",
            external_id=f"ext-{i}",
            email=f"user{i}@example.com",
            first_name=f"Name {i}",
            events=[event(f"evt-{i}-a", "Signed Up"), event(f"evt-{i}-b", "Upgraded")],
        )
        for i in range(count)
    ]


async def started(start_app, **sync_config):
    client = await start_app(sync=sync_config) if sync_config else await start_app()
    await configure(
        client, synchronized_attributes=["first_name"], events_filter=["Signed Up", "Upgraded"]
    )
    await notify(client, *users_with_events())
    return client


async def runs(client) -> list[dict]:
    resp = await client.get("/api/runs", headers=ADMIN)
    assert resp.status == 200
    return (await resp.json())["runs"]


async def test_batch_packs_every_user_of_a_pass_into_one_request(start_app, fake_cio):
    client = await started(start_app)
    summary = await sync(client)
    assert (summary["sent"], summary["failed"], summary["events_sent"]) == (USERS, 0, 2 * USERS)
    assert requests_made(fake_cio) == 1 == summary["api_calls"]
    assert summary["users_per_request"] == USERS
    # Each user's identify ahead of its events, in one request.
    calls = operations(fake_cio)
    for i in range(USERS):
        kinds = [call.kind for call in calls if call.customer_id == f"ext-{i}"]
        assert kinds == ["identify", "event", "event"]
    assert {call.batch for call in calls} == {0}
    assert fake_cio.customers["ext-7"]["first_name"] == "Name 7"
    assert len(fake_cio.events) == 2 * USERS
    (run,) = await runs(client)
    assert (run["transport"], run["users_per_request"], run["requests"]) == ("batch", USERS, 1)


async def test_batch_207_fails_only_the_refused_operations_with_customerios_reason(
    start_app, fake_cio
):
    client = await started(start_app)
    fake_cio.refuse_operations(["ext-2"], actions=["identify"], message="email is invalid")
    fake_cio.refuse_operations(["ext-5"], actions=["event"], times=1, message="bad event")
    summary = await sync(client)
    assert (summary["sent"], summary["failed"]) == (USERS - 1, 1)
    assert requests_made(fake_cio) == 1

    refused = await get_user(client, "u2")
    assert refused["sync"]["status"] == "failed"
    assert "HTTP 207" in refused["customerio"]["last_error"]
    assert "email is invalid" in refused["customerio"]["last_error"]
    # Its events were in the same request and Customer.io took them.
    assert {e["status"] for e in refused["events"]} == {"sent"}

    # One refused event fails alone: its user and its other event went through.
    partly = await get_user(client, "u5")
    assert partly["sync"]["status"] == "synced"
    statuses = {e["event_id"]: (e["status"], e["reason"]) for e in partly["events"]}
    assert statuses["evt-5-a"][0] == "failed" and "bad event" in statuses["evt-5-a"][1]
    assert statuses["evt-5-b"] == ("sent", None)
    assert fake_cio.customers["ext-5"]["first_name"] == "Name 5"


async def test_batch_400_for_the_whole_request_isolates_the_bad_operation(start_app, fake_cio):
    client = await started(start_app)
    # Customer.io refuses the whole request while this operation is in it.
    fake_cio.refuse_operations(
        ["ext-11"],
        actions=["event"],
        predicate=lambda op: op["name"] == "Upgraded",
        whole_request=True,
        message="malformed operation",
    )
    summary = await sync(client)
    assert (summary["sent"], summary["failed"], summary["retrying"]) == (USERS, 0, 0)
    assert summary["events_sent"] == 2 * USERS - 1
    # Halving finds it: the bad one alone, a few requests, never one request per operation.
    operations_in_pass = USERS * 3
    assert requests_made(fake_cio) <= 1 + 2 * math.ceil(math.log2(operations_in_pass))
    bad = await get_user(client, "u11")
    statuses = {e["event_id"]: (e["status"], e["reason"]) for e in bad["events"]}
    assert statuses["evt-11-b"][0] == "failed"
    assert (
        "HTTP 400" in statuses["evt-11-b"][1] and "malformed operation" in statuses["evt-11-b"][1]
    )
    assert statuses["evt-11-a"] == ("sent", None)
    # Every other operation reached Customer.io exactly once.
    assert len(accepted(fake_cio, "identify")) == USERS
    assert len(fake_cio.events) == 2 * USERS - 1


async def test_batch_429_is_sent_again_after_the_pause_without_an_attempt(start_app, fake_cio):
    client = await started(start_app)
    fake_cio.fail_next(429, times=2, path=BATCH, headers={"Retry-After": "0"})
    summary = await sync(client)
    assert (summary["sent"], summary["retrying"]) == (USERS, 0)
    assert [r.status for r in fake_cio.requests_for("POST", BATCH)] == [429, 429, 200]
    user = await get_user(client, "u3")
    assert user["sync"]["attempts"] == 0


async def test_batch_5xx_retries_every_user_of_the_request_and_resends_the_same_ids(
    start_app, fake_cio
):
    client = await started(start_app)
    fake_cio.fail_next(503, times=1, path=BATCH)
    first = await sync(client)
    assert (first["sent"], first["retrying"]) == (0, USERS)
    assert (await get_user(client, "u0"))["sync"]["attempts"] == 1
    await asyncio.sleep(0.1)  # past the backoff (base 0.01 s, at most 0.05 s)
    second = await sync(client)
    assert (second["sent"], second["retrying"]) == (USERS, 0)
    failed, resent = (
        [c.body["id"] for c in operations(fake_cio, "event") if c.batch == position]
        for position in (0, 1)
    )
    # The same event ids: Customer.io keeps each event once.
    assert sorted(failed) == sorted(resent) and len(set(resent)) == 2 * USERS
    assert len(fake_cio.events) == 2 * USERS


async def test_batch_a_user_held_back_sends_nothing_of_its_later_requests(start_app, fake_cio):
    client = await start_app(sync={"batch_max_operations": 1})
    await configure(client, synchronized_attributes=["first_name"], events_filter=["Signed Up"])
    await notify(client, message("u1", first_name="Ana", events=[event("e1", "Signed Up")]))
    # Identify and event in a request each: the identify's fails, so the event waits for it.
    fake_cio.fail_next(503, times=1, path=BATCH)
    first = await sync(client)
    assert first["retrying"] == 1 and first["events_sent"] == 0
    assert [c.kind for c in operations(fake_cio)] == ["identify"]
    await asyncio.sleep(0.1)
    second = await sync(client)
    assert (second["sent"], second["events_sent"]) == (1, 1)
    assert [c.kind for c in operations(fake_cio)] == ["identify", "identify", "event"]


async def test_batch_anonymous_events_stay_on_v1(start_app, fake_cio):
    client = await start_app()
    await configure(client, events_filter=["Viewed"], anonymous_events=True)
    anonymous = message(
        "anon", external_id=None, anonymous_ids=["anon-123"], events=[event("e-anon", "Viewed")]
    )
    known = message("known", external_id="ext-k", events=[event("e-known", "Viewed")])
    await notify(client, anonymous, known)
    summary = await sync(client)
    assert summary["events_sent"] == 2
    (v1,) = fake_cio.requests_for("POST", "/api/v1/events")
    assert v1.body["anonymous_id"] == "anon-123" and v1.body["name"] == "Viewed"
    (batch,) = fake_cio.requests_for("POST", BATCH)
    assert [op["action"] for op in batch.body["batch"]] == ["identify", "event"]


async def test_batch_user_split_over_two_requests_resumes_with_what_is_left(start_app, fake_cio):
    client = await start_app(sync={"batch_max_bytes": 40_000})
    names = [f"attr_{i:02}" for i in range(60)]
    await configure(client, synchronized_attributes=names)
    await notify(client, message("big", external_id="ext-big", **{n: "v" * 900 for n in names}))

    # Identify operations of ~28 KB: the user's first one alone in a request, the rest in the
    # next one, sent only once the first is answered. The second request fails.
    def holds_a_later_chunk(body) -> bool:
        return names[40] in body["batch"][0].get("attributes", {})

    fake_cio.fail_next(503, times=1, path=BATCH, when=holds_a_later_chunk)
    first = await sync(client)
    assert first["retrying"] == 1
    assert [r.status for r in fake_cio.requests_for("POST", BATCH)] == [200, 503]
    applied, failed = ({} for _ in range(2))
    for call in operations(fake_cio, "identify"):
        (applied if call.batch == 0 else failed).update(call.body)
    assert failed and applied and not set(failed) & set(applied)
    assert set(applied) <= set(fake_cio.customers["ext-big"])
    assert not set(failed) & set(fake_cio.customers["ext-big"])
    assert set(names) <= set(failed) | set(applied)
    before = len(identify_bodies(fake_cio, "ext-big"))
    await asyncio.sleep(0.1)  # past the backoff
    second = await sync(client)
    assert second["sent"] == 1
    # Only what Customer.io did not confirm goes again.
    resent: dict = {}
    for body in identify_bodies(fake_cio, "ext-big")[before:]:
        resent.update(body)
    assert resent == failed
    assert set(names) <= set(fake_cio.customers["ext-big"])


@pytest.mark.timeout(120)
async def test_batch_kill_9_in_the_middle_of_a_request_loses_nothing_and_sends_once(
    tmp_path: Path, db_url: str, fake_cio
):
    settings = write_toml(
        tmp_path / "settings.toml",
        {
            "database": {"url": db_url},
            "security": {"admin_password": ADMIN_PASSWORD, "ingest_token": INGEST_TOKEN},
            "customerio": {"track_host": fake_cio.host, "ca_file": fake_cio.ca_file},
            "sync": {"lease_seconds": 1, "transport": "batch"},
            "connector": {
                "site_id": fake_cio.site_id,
                "api_key": fake_cio.api_key,
                "synchronized_segments": ["seg-paying"],
                "synchronized_attributes": ["first_name"],
                "events_filter": ["Signed Up", "Upgraded"],
            },
        },
    )
    lines = tmp_path / "users.jsonl"
    lines.write_text("".join(json.dumps(m) + "\n" for m in users_with_events()), encoding="utf-8")
    result = await run_cli(settings, "import", str(lines))
    assert result.code == 0, result.stderr
    # The process dies while its request is out; Customer.io applies it a moment later.
    fake_cio.slow_next(1, path=BATCH)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "connector",
        "--config",
        str(settings),
        "sync",
        "--once",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
        cwd=tmp_path,
    )
    for _ in range(300):
        if fake_cio.requests_for("POST", BATCH):
            break
        await asyncio.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    await process.wait()
    assert len(fake_cio.requests_for("POST", BATCH)) == 1

    await asyncio.sleep(1.5)  # the held request is applied and the dead pass's lease ends
    result = await run_cli(settings, "sync", "--once")
    assert result.code == 0, result.stderr
    assert "sent 30" in result.stdout
    assert {f"ext-{i}" for i in range(USERS)} <= set(fake_cio.customers)
    assert all(fake_cio.customers[f"ext-{i}"]["first_name"] == f"Name {i}" for i in range(USERS))
    # Re-sent events carry the same ids: each is kept once.
    assert len(fake_cio.events) == 2 * USERS


async def test_batch_page_shows_the_transport_and_users_per_request(start_app, fake_cio):
    client = await logged_in(start_app)
    await configure(client, synchronized_attributes=["first_name"])
    await notify(client, *users_with_events(12))
    await sync(client)
    html = await page_html(client)
    assert re.search(r'id="transport">Transport: <strong>batch</strong>', html)
    assert re.search(r'id="run-users-per-request">12.0<', html)
    assert re.search(r'id="run-requests">1<', html)
