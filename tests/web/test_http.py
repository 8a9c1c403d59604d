"""The HTTP surface of the running service: who may call what, bad input, the settings API,
the probes, user look-ups and the generated ingest token.

Every test talks to the app over HTTP (``start_app``); the database a test looks at is the one
the app writes to, read back through ``GET /api/users`` and ``GET /api/settings``.
"""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import func, select

from connector.config import Config, parse_config
from connector.db.models import SyncRun
from connector.notifications.parse import parse_notification
from connector.notifications.store import store_messages
from connector.runtime import open_runtime
from connector.settings.model import MASK
from connector.web.keys import runtime_key

from ..conftest import ADMIN, ADMIN_PASSWORD, INGEST, INGEST_TOKEN, basic_auth
from ..helpers import message, notification

NOTIFICATION_LIMIT = 10 * 1024 * 1024
INGEST_ROUTES = ["/smart-notifier", "/batch"]
ADMIN_ROUTES = [
    ("GET", "/api/settings"),
    ("PATCH", "/api/settings"),
    ("POST", "/api/sync"),
    ("GET", "/api/users"),
    ("GET", "/api/users/u1"),
]
BAD_ADMIN_CREDENTIALS = {
    "no credentials": {},
    "wrong password": basic_auth("admin", "not-the-password"),
    "wrong user name": basic_auth("root", ADMIN_PASSWORD),
    "bearer instead of basic": {"Authorization": f"Bearer {ADMIN_PASSWORD}"},
    "not base64": {"Authorization": "Basic %%%not-base64%%%"},
}
BAD_INGEST_CREDENTIALS = {
    "no token": {},
    "wrong bearer token": {"Authorization": "Bearer wrong-token-0123456789"},
    "basic instead of bearer": basic_auth("admin", INGEST_TOKEN),
    "token without scheme": {"Authorization": INGEST_TOKEN},
    "empty bearer": {"Authorization": "Bearer "},
}
DEFAULT_SETTINGS = {
    "site_id": "",
    "api_key": "",
    "region": "us",
    "user_id_mapping": "external_id",
    "synchronized_segments": [],
    "synchronized_attributes": [],
    "enable_user_deletion": False,
    "events_filter": [],
    "anonymous_events": False,
    "max_attributes_per_call": 30,
    "webhook_signing_key": "",
    "webhook_timestamp_tolerance_seconds": 300,
    "incoming_metrics": None,
    "forward_url": "",
    "forward_write_key": "",
    "forward_event_prefix": "",
    # Read-only: how the sync talks to Customer.io ([sync] of the configuration file).
    "sync": {"transport": "batch", "batch_max_bytes": 450_000, "batch_max_operations": 1000},
}


@pytest.fixture
def bare_config(db_url: str, fake_cio) -> Callable[..., Config]:
    """A configuration with only what is required: no ingest token, no ``[connector]`` seed."""

    def build(**sections: dict[str, Any]) -> Config:
        raw: dict[str, Any] = {
            "database": {"url": db_url},
            "security": {"admin_password": ADMIN_PASSWORD},
            "customerio": {"track_host": fake_cio.host, "ca_file": fake_cio.ca_file},
            "sync": {"scheduled": False},
        }
        for section, values in sections.items():
            raw.setdefault(section, {}).update(values)
        return parse_config(raw)

    return build


async def restart(start_app, client, config: Config):
    """Stop the running app and start a new one on the same database."""
    await client.close()
    return await start_app(config)


async def find_users(client, **query: str) -> list[dict[str, Any]]:
    resp = await client.get("/api/users", params=query, headers=ADMIN)
    assert resp.status == 200, await resp.text()
    return (await resp.json())["users"]


async def get_settings(client) -> dict[str, Any]:
    resp = await client.get("/api/settings", headers=ADMIN)
    assert resp.status == 200, await resp.text()
    return await resp.json()


async def patch_settings(client, patch: Any) -> Any:
    resp = await client.patch("/api/settings", json=patch, headers=ADMIN)
    return resp.status, await resp.json()


async def notify(client, *messages: dict[str, Any], headers: dict[str, str] = INGEST) -> Any:
    resp = await client.post("/smart-notifier", json=notification(*messages), headers=headers)
    return resp.status, await resp.json()


async def sync(client) -> dict[str, Any]:
    resp = await client.post("/api/sync?wait=1", headers=ADMIN)
    assert resp.status == 200, await resp.text()
    return await resp.json()


async def assert_json_error(resp, status: int) -> dict[str, Any]:
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/json"
    body = await resp.json()
    assert isinstance(body["error"], str) and body["error"]
    return body


# -- ingest token ------------------------------------------------------------------------


@pytest.mark.parametrize("route", INGEST_ROUTES)
@pytest.mark.parametrize("credentials", BAD_INGEST_CREDENTIALS, ids=str)
async def test_ingest_auth_rejects_bad_credentials_and_stores_nothing(
    start_app, route, credentials
):
    client = await start_app()
    resp = await client.post(
        route, json=notification(message()), headers=BAD_INGEST_CREDENTIALS[credentials]
    )
    await assert_json_error(resp, 401)
    assert await find_users(client, external_id="ext-1") == []


@pytest.mark.parametrize("route", INGEST_ROUTES)
async def test_ingest_auth_accepts_the_configured_token(start_app, route):
    client = await start_app()
    resp = await client.post(route, json=notification(message()), headers=INGEST)
    assert resp.status == 200
    assert [u["id"] for u in await find_users(client, external_id="ext-1")] == ["u1"]


async def test_ingest_token_is_generated_once_and_kept_across_restarts(start_app, bare_config):
    config = bare_config()
    client = await start_app(config)
    token = client.app[runtime_key].secrets.ingest_token
    assert len(token) >= 32
    bearer = {"Authorization": f"Bearer {token}"}
    assert (await notify(client, message(), headers=bearer))[0] == 200
    assert (await notify(client, message(), headers=INGEST))[0] == 401

    client = await restart(start_app, client, config)
    assert client.app[runtime_key].secrets.ingest_token == token
    assert (await notify(client, message("u2", external_id="ext-2"), headers=bearer))[0] == 200
    assert {u["id"] for u in await find_users(client)} == {"u1", "u2"}


async def test_ingest_token_configured_wins_over_the_generated_one(start_app, bare_config):
    client = await start_app(bare_config())
    generated = {"Authorization": f"Bearer {client.app[runtime_key].secrets.ingest_token}"}

    client = await restart(start_app, client, bare_config(security={"ingest_token": INGEST_TOKEN}))
    assert (await notify(client, message(), headers=generated))[0] == 401
    assert (await notify(client, message(), headers=INGEST))[0] == 200


# -- admin auth --------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "path"), ADMIN_ROUTES, ids=lambda v: str(v))
async def test_admin_auth_rejects_bad_credentials_on_every_route(start_app, method, path):
    client = await start_app()
    for name, headers in BAD_ADMIN_CREDENTIALS.items():
        resp = await client.request(
            method, path, json={"site_id": "changed-by-intruder"}, headers=headers
        )
        await assert_json_error(resp, 401)
        assert resp.headers["WWW-Authenticate"].startswith("Basic"), name
    assert (await get_settings(client))["site_id"] != "changed-by-intruder"


# -- notifications: bad input ------------------------------------------------------------


@pytest.mark.parametrize("route", INGEST_ROUTES)
async def test_notifications_malformed_json_is_400(start_app, route):
    client = await start_app()
    resp = await client.post(
        route,
        data=b'{"messages": [{"user": {"id": "u1"',
        headers={**INGEST, "Content-Type": "application/json"},
    )
    body = await assert_json_error(resp, 400)
    assert "malformed JSON" in body["error"]
    assert await find_users(client) == []


@pytest.mark.parametrize(
    "body",
    [
        [message()],
        "messages",
        42,
        None,
        {},
        {"messages": {"0": message()}},
        {"messages": "u1"},
        {"user": message()["user"]},
    ],
    ids=repr,
)
async def test_notifications_body_without_a_messages_list_is_400(start_app, body):
    client = await start_app()
    resp = await client.post("/smart-notifier", data=json.dumps(body), headers=INGEST)
    error = (await assert_json_error(resp, 400))["error"]
    assert "object" in error or "messages" in error
    assert await find_users(client) == []


async def test_notifications_body_over_10_mib_is_413(start_app):
    client = await start_app()
    head = json.dumps(notification(message()))[:-1].encode() + b', "padding": "'
    body = head + b"x" * (NOTIFICATION_LIMIT - len(head)) + b'"}'
    assert len(body) > NOTIFICATION_LIMIT
    resp = await client.post("/batch", data=io.BytesIO(body), headers=INGEST)
    await assert_json_error(resp, 413)
    assert await find_users(client) == []


async def test_notifications_body_just_under_10_mib_is_stored(start_app):
    client = await start_app()
    head = json.dumps(notification(message()))[:-1].encode() + b', "padding": "'
    body = head + b"x" * (NOTIFICATION_LIMIT - len(head) - 2) + b'"}'
    assert len(body) == NOTIFICATION_LIMIT
    resp = await client.post("/batch", data=io.BytesIO(body), headers=INGEST)
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["accepted"] == 1
    assert [u["id"] for u in await find_users(client)] == ["u1"]


async def test_notifications_bad_messages_are_rejected_by_index_and_good_ones_stored(start_app):
    client = await start_app()
    status, body = await notify(
        client,
        message("u1", external_id="ext-1"),
        "not an object",
        {"user": {"first_name": "Nobody"}},
        message("u2", external_id="ext-2", email="bo@example.com"),
        {"user": {"id": "u3"}, "events": "Signed Up"},
        {"segments": [{"id": "seg-paying"}]},
    )
    assert status == 200
    assert body["accepted"] == 2
    assert body["flow_control"] == {"type": "next"}
    rejected = {r["index"]: r["error"] for r in body["rejected"]}
    assert sorted(rejected) == [1, 2, 4, 5]
    assert "object" in rejected[1]
    assert "'id', 'external_id' and 'email'" in rejected[2]
    assert "'events'" in rejected[4]
    assert "'user'" in rejected[5]
    assert [u["id"] for u in await find_users(client)] == ["u1", "u2"]


async def test_http_unknown_route_is_404_json(start_app):
    client = await start_app()
    for path in ("/nope", "/api/nope", "/smart-notifier/extra"):
        await assert_json_error(await client.get(path, headers=ADMIN), 404)


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("GET", "/smart-notifier", "POST"),
        ("PUT", "/batch", "POST"),
        ("DELETE", "/api/users/u1", "GET"),
        ("PUT", "/api/settings", "PATCH"),
        ("POST", "/healthz", "GET"),
    ],
)
async def test_http_wrong_method_is_405_json_with_allow(start_app, method, path, allowed):
    client = await start_app()
    resp = await client.request(method, path, headers={**ADMIN, **INGEST})
    await assert_json_error(resp, 405)
    assert allowed in resp.headers["Allow"]


# -- settings API ------------------------------------------------------------------------


async def test_settings_get_returns_the_defaults_with_empty_secrets(start_app, bare_config):
    client = await start_app(bare_config())
    assert await get_settings(client) == DEFAULT_SETTINGS


async def test_settings_show_the_transport_of_the_configuration_file(start_app, make_config):
    config = make_config(sync={"transport": "single", "batch_max_operations": 50})
    client = await start_app(config)
    shown = (await get_settings(client))["sync"]
    assert shown == {"transport": "single", "batch_max_bytes": 450_000, "batch_max_operations": 50}
    # A GET's body may come back in a PATCH as it was; changing the transport there may not.
    body = await get_settings(client)
    body["api_key"] = "new-api-key"
    status, patched = await patch_settings(client, body)
    assert status == 200 and patched["sync"] == shown
    status, answer = await patch_settings(client, {"sync": {**shown, "transport": "batch"}})
    assert status == 400
    assert "configuration file" in answer["errors"]["sync"][0]
    assert (await get_settings(client))["sync"]["transport"] == "single"


async def test_settings_get_masks_secrets_that_are_set(start_app, fake_cio):
    client = await start_app()
    status, patched = await patch_settings(
        client,
        {"webhook_signing_key": "signing-key-secret", "forward_write_key": "write-key-secret"},
    )
    assert status == 200
    resp = await client.get("/api/settings", headers=ADMIN)
    text = await resp.text()
    for secret in (fake_cio.api_key, "signing-key-secret", "write-key-secret"):
        assert secret not in text
        assert secret not in json.dumps(patched)
    settings = json.loads(text)
    assert settings["api_key"] == MASK
    assert settings["webhook_signing_key"] == MASK
    assert settings["forward_write_key"] == MASK
    assert settings["site_id"] == fake_cio.site_id


async def test_settings_patch_reports_every_bad_field_and_saves_nothing(start_app):
    client = await start_app()
    before = await get_settings(client)
    status, body = await patch_settings(
        client,
        {
            "site_id": "a-valid-change",
            "region": "mars",
            "max_attributes_per_call": 0,
            "synchronized_segments": "seg-paying",
            "events_filter": ["Signed Up", " "],
            "enable_user_deletion": "sometimes",
            "forward_url": "ftp://example.com",
            "incoming_metrics": ["email-opened"],
            "no_such_setting": 1,
        },
    )
    assert status == 400
    assert set(body["errors"]) == {
        "region",
        "max_attributes_per_call",
        "synchronized_segments",
        "events_filter",
        "enable_user_deletion",
        "forward_url",
        "incoming_metrics",
        "no_such_setting",
    }
    assert all(body["errors"][field] for field in body["errors"])
    assert await get_settings(client) == before


@pytest.mark.parametrize("body", [b"[1, 2]", b'"region"', b"{not json"], ids=repr)
async def test_settings_patch_that_is_not_an_object_is_400(start_app, body):
    client = await start_app()
    before = await get_settings(client)
    resp = await client.patch("/api/settings", data=body, headers=ADMIN)
    assert resp.status == 400
    reply = await resp.json()
    assert reply.get("errors") or reply.get("error")
    assert await get_settings(client) == before


async def test_settings_patch_is_persisted_across_restarts(start_app, make_config):
    config = make_config()
    client = await start_app(config)
    patch = {
        "region": "eu",
        "synchronized_attributes": ["first_name", "plan"],
        "events_filter": ["Signed Up", "page"],
        "max_attributes_per_call": 12,
        "enable_user_deletion": True,
    }
    status, body = await patch_settings(client, patch)
    assert status == 200
    assert {key: body[key] for key in patch} == patch
    assert await get_settings(client) == body

    client = await restart(start_app, client, config)
    assert await get_settings(client) == body


async def test_settings_patch_with_the_mask_keeps_the_secret(start_app, fake_cio):
    client = await start_app()
    status, body = await patch_settings(client, {"api_key": MASK, "site_id": fake_cio.site_id})
    assert status == 200
    assert body["api_key"] == MASK
    assert (await notify(client, message()))[0] == 200
    summary = await sync(client)
    assert summary["sent"] == 1 and summary["error"] is None
    assert [r.auth_ok for r in fake_cio.requests] == [True]


async def test_settings_patch_with_an_empty_secret_clears_it(start_app):
    client = await start_app()
    status, body = await patch_settings(client, {"api_key": ""})
    assert status == 200
    assert body["api_key"] == ""
    status = await (await client.get("/status")).json()
    assert any("credentials are missing" in m for m in status["messages"])


async def test_settings_toml_seed_applies_only_while_the_database_holds_none(
    start_app, make_config
):
    first = make_config(connector={"synchronized_attributes": ["plan"], "events_filter": ["A"]})
    client = await start_app(first)
    settings = await get_settings(client)
    assert settings["synchronized_attributes"] == ["plan"]
    assert settings["events_filter"] == ["A"]
    assert (await patch_settings(client, {"events_filter": ["B"]}))[0] == 200

    second = make_config(
        connector={"synchronized_attributes": ["other"], "max_attributes_per_call": 5}
    )
    client = await restart(start_app, client, second)
    settings = await get_settings(client)
    assert settings["synchronized_attributes"] == ["plan"]
    assert settings["events_filter"] == ["B"]
    assert settings["max_attributes_per_call"] == 30


# -- sync API and probes -----------------------------------------------------------------


async def _finished_runs(client) -> int:
    async with client.app[runtime_key].sessionmaker() as session:
        return await session.scalar(
            select(func.count()).select_from(SyncRun).where(SyncRun.finished_at.is_not(None))
        )


async def _wait_for(predicate, timeout: float = 5.0) -> bool:
    for _ in range(int(timeout / 0.05)):
        if await predicate():
            return True
        await asyncio.sleep(0.05)
    return False


async def test_sync_api_without_wait_starts_a_pass_and_answers_202(
    start_app, make_config, fake_cio
):
    config = make_config(sync={"scheduled": True, "interval_seconds": 3600})
    client = await start_app(config)

    async def first_pass_done() -> bool:
        return await _finished_runs(client) >= 1 and not client.app[runtime_key].sync.running

    assert await _wait_for(first_pass_done)
    # Stored behind the service's back, so nothing but the API call triggers the next pass.
    async with open_runtime(config) as runtime:
        parsed = parse_notification(notification(message()))
        await store_messages(runtime.sessionmaker, parsed.messages, via_batch=False)
    await asyncio.sleep(0.3)
    assert fake_cio.requests == []

    resp = await client.post("/api/sync", headers=ADMIN)
    assert resp.status == 202
    assert await resp.json() == {"started": True}

    async def sent() -> bool:
        return "ext-1" in fake_cio.customers

    assert await _wait_for(sent)


async def test_probes_healthz_and_readyz_answer_200(start_app):
    client = await start_app()
    resp = await client.get("/healthz")
    assert resp.status == 200 and (await resp.json())["status"] == "ok"
    resp = await client.get("/readyz")
    assert resp.status == 200 and (await resp.json())["status"] == "ready"


async def test_status_warns_without_a_whitelisted_segment(start_app, fake_cio):
    client = await start_app(connector={"synchronized_segments": []})
    resp = await client.get("/status")
    assert resp.status == 200
    text = await resp.text()
    assert fake_cio.api_key not in text
    status = json.loads(text)
    assert status["status"] == "warning"
    assert any("No whitelisted segment" in m for m in status["messages"])


async def test_status_is_ok_when_configured_and_nothing_failed(start_app, fake_cio):
    client = await start_app()
    assert await (await client.get("/status")).json() == {"status": "ok", "messages": []}
    await notify(client, message())
    await sync(client)
    resp = await client.get("/status")
    text = await resp.text()
    assert fake_cio.api_key not in text
    assert json.loads(text) == {"status": "ok", "messages": []}


async def test_metrics_is_prometheus_text_with_the_sync_counters(start_app, transport):
    client = await start_app()
    await notify(client, message())
    await sync(client)
    resp = await client.get("/metrics")
    assert resp.status == 200
    assert resp.content_type == "text/plain"
    text = await resp.text()
    # Batch: the identify went in one batch request.
    call = "batch" if transport == "batch" else "identify"
    for line in (
        "# TYPE connector_outbound_users_total counter",
        'connector_outbound_users_total{outcome="sent"} 1.0',
        f'connector_customerio_api_calls_total{{operation="{call}",status="200"}} 1.0',
        'connector_notifications_total{outcome="stored",route="smart-notifier"} 1.0',
        'connector_queue_depth{queue="outbound_users"} 0.0',
    ):
        assert line in text.splitlines(), line


# -- users API ---------------------------------------------------------------------------


async def test_users_api_finds_users_by_email_and_external_id(start_app):
    client = await start_app()
    await notify(
        client,
        message("u1", external_id="ext-1", email="ana@example.com"),
        message("u2", external_id="ext-2", email="bo@example.com"),
    )
    assert [u["id"] for u in await find_users(client, email="bo@example.com")] == ["u2"]
    (user,) = await find_users(client, external_id="ext-1")
    assert user["id"] == "u1" and user["email"] == "ana@example.com"
    assert user["sync"]["pending"] is True
    both = await find_users(client, email="ana@example.com", external_id="ext-2")
    assert both == []
    assert await find_users(client, email="nobody@example.com") == []


async def test_users_api_filters_by_sync_status(start_app, fake_cio, transport):
    client = await start_app()
    await notify(client, message("u1", external_id="ext-1"), message("u2", external_id="ext-2"))
    if transport == "batch":
        fake_cio.refuse_operations(["ext-2"])
    else:
        fake_cio.fail_next(400, method="PUT", path="/api/v1/customers/ext-2")
    await sync(client)
    (failed,) = await find_users(client, status="failed")
    assert (failed["id"], failed["sync"]["status"]) == ("u2", "failed")
    assert [u["sync"]["status"] for u in await find_users(client, status="synced")] == ["synced"]
    assert await find_users(client, status="pending") == []
    assert await find_users(client, status="no-such-status") == []


async def test_users_api_unknown_user_is_404_json(start_app):
    client = await start_app()
    body = await assert_json_error(await client.get("/api/users/unknown", headers=ADMIN), 404)
    assert "unknown" in body["error"]
