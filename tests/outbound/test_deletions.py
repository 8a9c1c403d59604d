"""Deletion means "left", and the deletion guard, through the running service.

Passes are started with ``POST /api/sync?wait=1``; what was deleted is what the fake
Customer.io received.
"""

from __future__ import annotations

from typing import Any

from ..conftest import ADMIN
from ..helpers import message
from ..track_calls import operations
from ..web.test_admin import csrf_in, log_in, number, page_html
from .test_service import configure, get_user, notify, sync


def deleted_ids(fake_cio) -> set[str]:
    return {call.customer_id for call in operations(fake_cio, "delete")}


def users(count: int, *, segments: tuple[str, ...] = ("seg-paying",), start: int = 0) -> list:
    return [
        message(f"u{n}", external_id=f"ext-{n}", email=f"u{n}@example.com", segments=segments)
        for n in range(start, start + count)
    ]


async def notify_all(client, messages: list[dict[str, Any]], route: str = "/smart-notifier"):
    for offset in range(0, len(messages), 100):
        await notify(client, *messages[offset : offset + 100], route=route)


async def test_deletions_batch_users_never_in_a_segment_are_not_deleted(start_app, fake_cio):
    """The issue's reproduction: an import (like /batch) of users of which a third are outside
    the whitelisted segments, then a full pass: nobody is deleted."""
    client = await start_app()
    await configure(client, enable_user_deletion=True)
    inside = users(200)
    outside = users(100, segments=("seg-trial",), start=200)
    await notify_all(client, inside + outside, route="/batch")
    first = await sync(client)
    assert first["sent"] == 300

    resp = await client.post("/api/sync?wait=1&full=1", headers=ADMIN)
    summary = await resp.json()

    assert summary["deleted"] == 0 and summary["held"] == 0
    assert operations(fake_cio, "delete") == []
    user = await get_user(client, "u250")
    assert user["sync"]["status"] == "skipped"
    assert "never was when sent" in user["sync"]["skip_reason"]


async def test_deletions_batch_user_that_was_in_a_segment_is_deleted_when_it_leaves(
    start_app, fake_cio
):
    client = await start_app()
    await configure(client, enable_user_deletion=True)
    await notify(client, message("u1"), route="/batch")
    await sync(client)
    await notify(client, message("u1", segments=("seg-trial",)))
    await sync(client)

    assert deleted_ids(fake_cio) == {"ext-1"}


async def test_deletions_user_created_by_hulls_connector_is_deleted_when_outside(
    start_app, fake_cio
):
    client = await start_app()
    await configure(client, enable_user_deletion=True)
    # As the platform sends traits Hull's connector wrote: ``traits_`` and the group path.
    created = {"traits_customerio/created_at": "2019-01-01T00:00:00Z"}
    gone = {**created, "traits_customerio/deleted_at": "2019-02-01T00:00:00Z"}
    await notify(
        client,
        message("u1", external_id="ext-1", segments=(), **created),
        message("u2", external_id="ext-2", segments=(), **gone),
        message("u3", external_id="ext-3", segments=()),
    )
    await sync(client)

    assert deleted_ids(fake_cio) == {"ext-1"}


async def test_deletions_over_the_limit_are_held_until_confirmed(start_app, fake_cio):
    client = await start_app(sync={"max_deletions_per_pass": 100})
    await configure(client, enable_user_deletion=True)
    await notify_all(client, users(160))
    await sync(client)
    leaving = users(150, segments=("seg-trial",))
    await notify_all(client, leaving)

    summary = await sync(client)

    assert summary["held"] == 150 and summary["deleted"] == 0
    assert operations(fake_cio, "delete") == []
    user = await get_user(client, "u0")
    assert user["sync"]["status"] == "held"
    assert "150 deletions" in user["sync"]["skip_reason"]
    status = await (await client.get("/status")).json()
    assert status["status"] == "warning"
    assert any("150 deletion(s) held" in line for line in status["messages"])
    held = await (await client.get("/api/deletions", headers=ADMIN)).json()
    assert held["count"] == 150
    assert {user["id"] for user in held["users"]} == {f"u{n}" for n in range(150)}

    # A pass with nothing new sends nothing: the held users wait for the confirmation.
    assert (await sync(client))["deleted"] == 0
    resp = await client.post("/api/deletions/confirm", headers=ADMIN)
    assert resp.status == 200
    assert (await resp.json())["confirmed"] == 150
    # The confirmation starts a pass; this one runs after it (one pass at a time).
    summary = await sync(client)

    assert summary["held"] == 0
    assert deleted_ids(fake_cio) == {f"ext-{n}" for n in range(150)}
    assert len(operations(fake_cio, "delete")) == 150
    assert (await get_user(client, "u0"))["sync"]["status"] == "deleted"
    assert (await (await client.get("/api/deletions", headers=ADMIN)).json())["count"] == 0
    status = await (await client.get("/status")).json()
    assert not any("held" in line for line in status["messages"])


async def test_deletions_held_user_that_comes_back_is_sent_not_deleted(start_app, fake_cio):
    client = await start_app(sync={"max_deletions_per_pass": 1})
    await configure(client, enable_user_deletion=True)
    await notify(client, *users(2))
    await sync(client)
    await notify(client, *users(2, segments=()))
    assert (await sync(client))["held"] == 2

    await notify(client, message("u0", external_id="ext-0", email="u0@example.com", plan="x"))
    summary = await sync(client)

    # Back as it was when last sent: Customer.io holds it already, nothing to send or delete.
    assert summary["skipped"] == 1 and summary["held"] == 0
    user = await get_user(client, "u0")
    assert user["sync"]["status"] == "skipped"
    assert user["sync"]["skip_reason"] == "no changes"
    held = await (await client.get("/api/deletions", headers=ADMIN)).json()
    assert [user["id"] for user in held["users"]] == ["u1"]
    await client.post("/api/deletions/confirm", headers=ADMIN)
    await sync(client)
    assert deleted_ids(fake_cio) == {"ext-1"}


async def test_deletions_at_or_under_the_limit_go_out(start_app, fake_cio):
    client = await start_app(sync={"max_deletions_per_pass": 3})
    await configure(client, enable_user_deletion=True)
    await notify(client, *users(3))
    await sync(client)
    await notify(client, *users(3, segments=()))

    summary = await sync(client)

    assert summary["deleted"] == 3 and summary["held"] == 0


async def test_deletions_guard_off_with_zero(start_app, fake_cio):
    client = await start_app(sync={"max_deletions_per_pass": 0})
    await configure(client, enable_user_deletion=True)
    await notify(client, *users(5))
    await sync(client)
    await notify(client, *users(5, segments=()))

    assert (await sync(client))["deleted"] == 5


async def test_deletions_confirm_rejects_a_bad_body(start_app):
    client = await start_app()
    resp = await client.post("/api/deletions/confirm", json={"user_ids": "u1"}, headers=ADMIN)
    assert resp.status == 400
    assert (await client.post("/api/deletions/confirm")).status == 401


async def test_deletions_held_are_shown_on_the_page_and_confirmed_there(start_app, fake_cio):
    client = await start_app(sync={"max_deletions_per_pass": 2})
    await configure(client, enable_user_deletion=True)
    await notify_all(client, users(4))
    await sync(client)
    await notify_all(client, users(3, segments=("seg-trial",)))
    assert (await sync(client))["held"] == 3
    await log_in(client)

    html = await page_html(client)
    assert number(html, "held-deletions") == 3
    assert 'id="confirm-deletions"' in html
    resp = await client.post(
        "/admin/deletions/confirm", data={"csrf_token": csrf_in(html)}, allow_redirects=False
    )
    assert resp.status == 303

    assert deleted_ids(fake_cio) == {"ext-0", "ext-1", "ext-2"}
    html = await page_html(client)
    assert 'id="confirm-deletions"' not in html
    assert "3 deletion(s) confirmed" in html
    audit = await (await client.get("/api/audit", headers=ADMIN)).json()
    confirmed = [e for e in audit["entries"] if e["action"] == "deletions_confirmed"]
    assert [e["detail"] for e in confirmed] == [{"via": "page", "users": 3}]


async def test_deletions_confirm_form_checks_the_csrf_token(start_app, fake_cio):
    client = await start_app(sync={"max_deletions_per_pass": 1})
    await configure(client, enable_user_deletion=True)
    await notify_all(client, users(2))
    await sync(client)
    await notify_all(client, users(2, segments=("seg-trial",)))
    assert (await sync(client))["held"] == 2
    await log_in(client)

    resp = await client.post(
        "/admin/deletions/confirm", data={"csrf_token": "wrong"}, allow_redirects=False
    )

    assert resp.status == 403
    assert (await (await client.get("/api/deletions", headers=ADMIN)).json())["count"] == 2
    assert operations(fake_cio, "delete") == []
