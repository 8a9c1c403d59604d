"""The run history (``GET /api/runs``) and the audit log (``GET /api/audit``) through the
admin API and the command line: every pass with the trigger that asked for it and its counts,
and what operators did, with secrets only ever "changed"."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sqlalchemy import func, select

from connector.db.models import SyncRun
from connector.db.types import utcnow
from connector.outbound.repository import RUNS_KEPT
from connector.web.keys import runtime_key

from ..conftest import ADMIN, INGEST, basic_auth
from ..helpers import message, notification
from ..test_cli import import_good_users, run_cli, settings_file  # noqa: F401 (a fixture)
from ..track_calls import identify_requests


async def runs(client, query: str = "") -> list[dict[str, Any]]:
    resp = await client.get(f"/api/runs{query}", headers=ADMIN)
    assert resp.status == 200, await resp.text()
    return (await resp.json())["runs"]


async def audit(client, query: str = "") -> list[dict[str, Any]]:
    resp = await client.get(f"/api/audit{query}", headers=ADMIN)
    assert resp.status == 200, await resp.text()
    return (await resp.json())["entries"]


async def notify(client, *messages: dict[str, Any]) -> None:
    resp = await client.post("/smart-notifier", json=notification(*messages), headers=INGEST)
    assert resp.status == 200, await resp.text()


async def wait_for_runs(client, count: int) -> list[dict[str, Any]]:
    """The history once ``count`` passes have finished (the service runs them in the
    background)."""
    for _ in range(100):
        found = await runs(client)
        if len([run for run in found if run["finished_at"]]) >= count:
            return found
        await asyncio.sleep(0.05)
    raise AssertionError(f"fewer than {count} finished runs: {found}")


# The run history


async def test_runs_record_an_api_pass_with_its_counts(start_app, fake_cio):
    client = await start_app()
    await notify(
        client, message("u1"), message("u2", external_id="ext-2"), message("u3", segments=())
    )
    resp = await client.post("/api/sync?wait=1", headers=ADMIN)
    assert resp.status == 200
    [run] = await runs(client)
    assert run["trigger"] == "api"
    assert run["full"] is False
    assert run["finished_at"] >= run["started_at"]
    counts = {name: run[name] for name in ("sent", "skipped", "deleted", "held", "failed")}
    assert counts == {"sent": 2, "skipped": 1, "deleted": 0, "held": 0, "failed": 0}
    assert run["requests"] == len(fake_cio.requests) > 0
    assert (run["error"], run["errors"]) == (None, [])


async def test_runs_keep_the_first_distinct_error_reasons(start_app, fake_cio, transport):
    client = await start_app(sync={"max_attempts": 1, "concurrency": 1})
    if transport == "batch":
        # Each identify refused in the request that carries all three (a 207).
        fake_cio.refuse_operations(actions=["identify"], times=3)
    else:
        fake_cio.fail_next(400, times=3, method="PUT")
    await notify(client, *(message(f"u{i}", external_id=f"ext-{i}") for i in range(3)))
    await client.post("/api/sync?wait=1", headers=ADMIN)
    [run] = await runs(client)
    assert run["failed"] == 3
    # Three users failed the same way: one reason.
    status = "HTTP 207" if transport == "batch" else "HTTP 400"
    assert len(run["errors"]) == 1 and status in run["errors"][0]


async def test_runs_count_users_that_will_be_retried_with_their_reason(
    start_app, fake_cio, transport
):
    client = await start_app(sync={"max_attempts": 5})
    fake_cio.fail_next(503, **identify_requests(transport))
    await notify(client, message("u1"))
    await client.post("/api/sync?wait=1", headers=ADMIN)
    [run] = await runs(client)
    assert (run["retrying"], run["failed"]) == (1, 0)
    assert len(run["errors"]) == 1 and "503" in run["errors"][0]


async def test_runs_are_newest_first_and_limited(start_app):
    client = await start_app()
    await client.post("/api/sync?wait=1", headers=ADMIN)
    await client.post("/api/sync?wait=1&full=1", headers=ADMIN)
    both = await runs(client)
    assert [run["full"] for run in both] == [True, False]
    assert both[0]["id"] > both[1]["id"]
    assert await runs(client, "?limit=1") == both[:1]


@pytest.mark.parametrize("limit", ["0", "-1", "ten", "99999999999999999999"])
async def test_runs_and_audit_refuse_a_bad_limit(start_app, limit):
    client = await start_app()
    for path in ("/api/runs", "/api/audit"):
        resp = await client.get(f"{path}?limit={limit}", headers=ADMIN)
        assert resp.status == 400, (path, limit)


async def test_runs_keep_only_the_newest_thousand(start_app):
    client = await start_app()
    runtime = client.app[runtime_key]
    async with runtime.sessionmaker() as session, session.begin():
        session.add_all(
            SyncRun(instance="old", trigger="schedule", started_at=utcnow(), finished_at=utcnow())
            for _ in range(RUNS_KEPT)
        )
    async with runtime.sessionmaker() as session:
        oldest = await session.scalar(select(func.min(SyncRun.id)))
    await client.post("/api/sync?wait=1", headers=ADMIN)
    async with runtime.sessionmaker() as session:
        kept = await session.scalar(select(func.count()).select_from(SyncRun))
        first = await session.scalar(select(func.min(SyncRun.id)))
    assert kept == RUNS_KEPT
    assert first == oldest + 1
    assert (await runs(client, "?limit=1"))[0]["trigger"] == "api"


async def test_runs_a_pass_a_notification_asked_for_says_notification(start_app, fake_cio):
    client = await start_app(sync={"scheduled": True, "interval_seconds": 3600})
    # The schedule's own first pass, at start.
    await wait_for_runs(client, 1)
    await notify(client, message("u1"))
    history = await wait_for_runs(client, 2)
    assert [run["trigger"] for run in history] == ["notification", "schedule"]
    assert history[0]["sent"] == 1


async def test_runs_a_retry_is_recorded_as_its_callers_pass(start_app, fake_cio, transport):
    client = await start_app(sync={"max_attempts": 1})
    fake_cio.fail_next(400, **identify_requests(transport))
    await notify(client, message("u1"))
    await client.post("/api/sync?wait=1", headers=ADMIN)
    resp = await client.post("/api/retry-failed", headers=ADMIN)
    assert (await resp.json())["retried"]["users"] == 1
    history = await wait_for_runs(client, 2)
    assert [run["trigger"] for run in history] == ["api", "api"]
    assert (history[0]["sent"], history[1]["failed"]) == (1, 1)


async def test_runs_and_audit_of_the_cli(settings_file, tmp_path, start_app):  # noqa: F811
    settings = settings_file()
    await import_good_users(settings, tmp_path)
    assert (await run_cli(settings, "sync", "--once")).code == 0
    assert (await run_cli(settings, "retry-failed")).code == 0
    client = await start_app()
    [run] = await runs(client)
    assert (run["trigger"], run["sent"]) == ("cli", 3)
    [entry] = await audit(client)
    assert (entry["action"], entry["source"]) == ("retry_failed", "cli")
    assert entry["detail"]["retried"] == {"users": 0, "webhooks": 0, "forwarding": 0}


# The audit log


async def test_audit_records_a_settings_patch_by_field_and_never_a_secret(start_app):
    client = await start_app()
    resp = await client.patch(
        "/api/settings",
        json={"api_key": "sk-audit-secret-value", "max_attributes_per_call": 40},
        headers=ADMIN,
    )
    assert resp.status == 200
    [entry] = await audit(client)
    assert entry["action"] == "settings_changed"
    assert entry["source"] == "127.0.0.1"
    assert entry["detail"]["via"] == "api"
    assert entry["detail"]["fields"]["api_key"] == "changed"
    assert entry["detail"]["fields"]["max_attributes_per_call"]["to"] == 40
    text = await (await client.get("/api/audit", headers=ADMIN)).text()
    assert "sk-audit-secret-value" not in text


async def test_audit_skips_a_patch_that_changes_nothing(start_app):
    client = await start_app()
    current = await (await client.get("/api/settings", headers=ADMIN)).json()
    resp = await client.patch("/api/settings", json={"site_id": current["site_id"]}, headers=ADMIN)
    assert resp.status == 200
    resp = await client.patch("/api/settings", json={"max_attributes_per_call": 0}, headers=ADMIN)
    assert resp.status == 400
    assert await audit(client) == []


async def test_audit_records_sync_now_retry_and_rotation_through_the_api(start_app):
    client = await start_app()
    await client.post("/api/sync?wait=1&full=1", headers=ADMIN)
    await client.post("/api/retry-failed", headers=ADMIN)
    before = await (await client.get("/api/webhook-url", headers=ADMIN)).json()
    rotated = await (await client.post("/api/webhook-url/rotate", headers=ADMIN)).json()
    entries = await audit(client)
    assert [e["action"] for e in entries] == ["webhook_url_rotated", "retry_failed", "sync_now"]
    assert {e["source"] for e in entries} == {"127.0.0.1"}
    assert {e["detail"]["via"] for e in entries} == {"api"}
    assert entries[2]["detail"]["full"] is True
    text = await (await client.get("/api/audit", headers=ADMIN)).text()
    for url in (before["url"], rotated["url"]):
        assert url.split("conf=")[1] not in text
    assert await audit(client, "?limit=1") == entries[:1]


async def test_audit_records_wrong_admin_api_credentials(start_app):
    client = await start_app()
    resp = await client.get("/api/settings", headers=basic_auth("admin", "not-the-password"))
    assert resp.status == 401
    [entry] = await audit(client)
    assert entry["action"] == "login_failed"
    assert entry["detail"] == {"via": "api", "reason": "wrong credentials"}
    assert entry["source"] == "127.0.0.1"
    assert "not-the-password" not in str(entry)
