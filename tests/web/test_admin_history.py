"""The settings page's *Recent runs* table and *Audit log* section, through the running
service: logging in, saving, rotating, syncing and retrying on the page are recorded with the
page as their trigger and the client's address as their source."""

from __future__ import annotations

import asyncio
import re
from html import unescape

from ..conftest import ADMIN, INGEST
from ..helpers import message, notification
from ..track_calls import identify_requests
from .test_admin import SECRETS, csrf_in, log_in, logged_in, page_html, submit

ROW = re.compile(r'<tr id="(?:run|audit)-\d+">(.*?)</tr>', re.S)
CELL = re.compile(r'<td[^>]*class="(?:num )?([^"]+)"[^>]*>(.*?)</td>', re.S)
TAG = re.compile(r"<[^>]+>")


def _rows(html: str, table_id: str) -> list[dict[str, str]]:
    """The rows of one of the page's history tables, as {cell class: text}."""
    start = html.index(f'id="{table_id}"')
    table = html[start : html.index("</table>", start)]
    return [
        {name: " ".join(unescape(TAG.sub("", text)).split()) for name, text in CELL.findall(row)}
        for row in ROW.findall(table)
    ]


def recent_runs(html: str) -> list[dict[str, str]]:
    return _rows(html, "recent-runs")


def audit_log(html: str) -> list[dict[str, str]]:
    return _rows(html, "audit-log")


async def test_admin_recent_runs_is_empty_before_any_pass(start_app):
    client = await logged_in(start_app)
    html = await page_html(client)
    assert '<p id="recent-runs">No sync has run yet.</p>' in html


async def test_admin_sync_now_shows_a_page_pass_in_recent_runs(start_app, fake_cio, transport):
    client = await logged_in(start_app, sync={"max_attempts": 1})
    fake_cio.fail_next(400, **identify_requests(transport))
    await client.post(
        "/smart-notifier",
        json=notification(message("u1"), message("u2", external_id="ext-2", segments=())),
        headers=INGEST,
    )
    await client.post("/api/sync?wait=1", headers=ADMIN)
    html = await page_html(client)
    resp = await client.post(
        "/admin/sync", data={"csrf_token": csrf_in(html)}, allow_redirects=False
    )
    assert resp.status == 303
    # The sync is not scheduled in the tests: the page ran it and says how it went.
    assert "Sync finished:" in await page_html(client)

    newest, first = recent_runs(await page_html(client))
    assert newest["trigger"] == "page"
    assert first["trigger"] == "api"
    assert (first["sent"], first["skipped"], first["failed"]) == ("0", "1", "1")
    assert "HTTP 400" in first["errors"]
    assert int(first["requests"]) >= 1
    assert newest["held"] == first["held"] == "0"


async def test_admin_retry_on_the_page_is_a_page_pass(start_app, fake_cio, transport):
    client = await logged_in(start_app, sync={"max_attempts": 1})
    fake_cio.fail_next(400, **identify_requests(transport))
    await client.post("/smart-notifier", json=notification(message("u1")), headers=INGEST)
    await client.post("/api/sync?wait=1", headers=ADMIN)
    html = await page_html(client)
    await client.post("/admin/retry-failed", data={"csrf_token": csrf_in(html)})
    for _ in range(100):
        rows = recent_runs(await page_html(client))
        if len(rows) == 2 and rows[0]["sent"] == "1":
            break
        await asyncio.sleep(0.05)
    assert [row["trigger"] for row in rows] == ["page", "api"]
    entries = audit_log(await page_html(client))
    assert entries[0]["action"] == "retry_failed"
    assert "users 1" in entries[0]["detail"] and "via: page" in entries[0]["detail"]


async def test_admin_audit_log_shows_logins_and_failed_logins(start_app):
    client = await start_app()
    assert (await log_in(client, "not-the-password")).status == 401
    assert (await log_in(client)).status == 303
    entries = audit_log(await page_html(client))
    assert [(e["action"], e["source"]) for e in entries] == [
        ("login", "127.0.0.1"),
        ("login_failed", "127.0.0.1"),
    ]
    assert "wrong password" in entries[1]["detail"]
    assert "not-the-password" not in await page_html(client)


async def test_admin_audit_log_shows_which_settings_changed_and_secrets_as_changed(start_app):
    client = await logged_in(start_app)
    resp = await submit(
        client,
        "/admin/settings",
        {"api_key": SECRETS["api_key"], "max_attributes_per_call": "40"},
    )
    assert resp.status == 303
    html = await page_html(client)
    [entry, _login] = audit_log(html)
    assert entry["action"] == "settings_changed"
    assert "api_key changed" in entry["detail"]
    assert "max_attributes_per_call 30 → 40" in entry["detail"]
    assert "via: page" in entry["detail"]
    assert SECRETS["api_key"] not in html

    # The same form again changes nothing, and records nothing.
    assert (await submit(client, "/admin/settings")).status == 303
    assert len(audit_log(await page_html(client))) == 2


async def test_admin_audit_log_shows_rotations_and_sync_now_from_the_page_and_the_api(
    start_app,
):
    client = await logged_in(start_app)
    html = await page_html(client)
    token = {"csrf_token": csrf_in(html)}
    await client.post("/admin/webhook-url/rotate", data=token)
    await client.post("/admin/sync", data=token)
    await client.post("/api/webhook-url/rotate", headers=ADMIN)
    await client.post("/api/sync?wait=1", headers=ADMIN)
    html = await page_html(client)
    actions = [(e["action"], e["detail"]) for e in audit_log(html)]
    assert actions == [
        ("sync_now", "full: False; via: api"),
        ("webhook_url_rotated", "via: api"),
        ("sync_now", "full: False; via: page"),
        ("webhook_url_rotated", "via: page"),
        ("login", "via: page"),
    ]
    assert "Audit log</a>" in html
