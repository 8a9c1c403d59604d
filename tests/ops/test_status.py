"""``GET /status`` shows trouble while it lasts: failing Track API calls, a credential check
Customer.io could not answer, and never a verdict the settings have made stale."""

from __future__ import annotations

import asyncio

import pytest

from connector.ops.status import CONNECT_ERROR, compute_status
from connector.settings.model import ConnectorSettings
from connector.web.keys import runtime_key

from ..helpers import message
from ..outbound.test_service import configure, notify, sync


async def get_status(client) -> dict:
    resp = await client.get("/status")
    assert resp.status == 200
    return await resp.json()


async def test_status_warns_while_track_calls_fail(start_app, fake_cio):
    client = await start_app()
    await notify(client, message())
    fake_cio.fail_next(503)

    await sync(client)

    status = await get_status(client)
    assert status["status"] == "warning"
    (line,) = [m for m in status["messages"] if "calls are failing" in m]
    assert "HTTP 503" in line

    # Calls going through again: the trouble is over.
    await asyncio.sleep(0.1)
    await sync(client)
    assert await get_status(client) == {"status": "ok", "messages": []}


async def test_status_warns_about_429s_even_when_they_were_absorbed(start_app, fake_cio):
    client = await start_app()
    await notify(client, message())
    fake_cio.fail_next(429)

    summary = await sync(client)

    assert summary["sent"] == 1
    status = await get_status(client)
    assert status["status"] == "warning"
    assert any("calls are failing" in m and "HTTP 429" in m for m in status["messages"])


async def test_status_credential_check_answered_5xx_is_an_error(start_app, fake_cio):
    client = await start_app()
    checker = client.app[runtime_key].credential_checker
    fake_cio.fail_next(500, path="/api/v1/accounts/region")

    await checker.check_stored()

    status = await get_status(client)
    assert status["status"] == "error"
    (line,) = status["messages"]
    assert line.startswith("Error when trying to connect with Customer.io: ")
    assert "Internal Server Error" in line

    await checker.check_stored()
    assert await get_status(client) == {"status": "ok", "messages": []}


async def test_status_has_no_stale_missing_credentials_once_they_are_saved(start_app, fake_cio):
    client = await start_app()
    await configure(client, site_id="", api_key="")
    await notify(client, message())
    summary = await sync(client)
    assert "not set" in summary["error"]
    assert (await get_status(client))["status"] == "warning"

    await configure(client, site_id=fake_cio.site_id, api_key=fake_cio.api_key)

    # Before any pass has run with them: nothing about credentials not being set.
    assert await get_status(client) == {"status": "ok", "messages": []}


async def test_status_invalid_credentials_go_once_new_ones_are_saved(start_app, fake_cio):
    client = await start_app()
    await configure(client, api_key="wrong-key")
    await notify(client, message())
    await sync(client)
    assert (await get_status(client))["status"] == "error"

    await configure(client, api_key=fake_cio.api_key)

    assert await get_status(client) == {"status": "ok", "messages": []}


@pytest.mark.parametrize(
    ("state", "reason", "expected"),
    [
        ("invalid", "Invalid credentials", "Invalid credentials"),
        ("invalid", "Customer.io answered 401", "Invalid credentials: Customer.io answered 401"),
        ("invalid", None, "Invalid credentials: Customer.io said 401"),
        ("unreachable", f"{CONNECT_ERROR}: timed out", f"{CONNECT_ERROR}: timed out"),
        (
            "unreachable",
            "HTTP 503 Service Unavailable",
            f"{CONNECT_ERROR}: HTTP 503 Service Unavailable",
        ),
    ],
)
def test_status_credential_reason_does_not_repeat_its_prefix(state, reason, expected):
    settings = ConnectorSettings(site_id="s", api_key="k", synchronized_segments=("seg",))
    status = compute_status(settings, {"state": state, "reason": reason}, None, 0)
    assert status.messages == [expected]
