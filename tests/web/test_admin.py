"""The settings page through the running service: login and its throttle, sessions and CSRF,
saving with validation, secrets kept out of the HTML, the webhook URL, the connection test
and the status panel."""

from __future__ import annotations

import re
from html import unescape
from html.parser import HTMLParser
from typing import Any

import pytest
from multidict import MultiDict

from connector.db.models import CatalogEntry
from connector.db.types import utcnow
from connector.web.admin.views import form_patch
from connector.web.keys import runtime_key
from connector.web.security import SESSION_COOKIE, LoginThrottle

from ..conftest import ADMIN, ADMIN_PASSWORD, INGEST
from ..helpers import event, message, notification, webhook
from ..inbound.test_service import fixture, post_webhook, wait_processed, webhook_path
from ..track_calls import identify_requests

CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')
SECRETS = {
    "api_key": "sk-live-very-secret-api-key",
    "webhook_signing_key": "whsec-very-secret-signing-key",
    "forward_write_key": "wk-very-secret-write-key",
}

PAGE_ROUTES = [
    ("GET", "/admin"),
    ("POST", "/admin/logout"),
    ("GET", "/admin/users?q=u1"),
    ("GET", "/admin/users/u1"),
    ("POST", "/admin/settings"),
    ("POST", "/admin/test-connection"),
    ("POST", "/admin/webhook-url/rotate"),
    ("POST", "/admin/sync"),
    ("POST", "/admin/retry-failed"),
]
API_ROUTES = [
    ("GET", "/api/settings"),
    ("PATCH", "/api/settings"),
    ("POST", "/api/sync"),
    ("GET", "/api/users"),
    ("GET", "/api/users/u1"),
    ("GET", "/api/events"),
    ("GET", "/api/inbound/stats"),
    ("GET", "/api/catalog"),
    ("GET", "/api/webhook-url"),
    ("POST", "/api/webhook-url/rotate"),
    ("GET", "/api/quarantine"),
    ("POST", "/api/retry-failed"),
    ("GET", "/api/runs"),
    ("GET", "/api/audit"),
]


class FormReader(HTMLParser):
    """What a browser would submit for one form of a page, untouched."""

    def __init__(self, form_id: str):
        super().__init__()
        self.form_id = form_id
        self.fields: list[tuple[str, str]] = []
        self._inside = False
        self._select: str | None = None
        self._textarea: str | None = None
        self._text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {key: value or "" for key, value in attrs}
        if tag == "form":
            self._inside = a.get("id") == self.form_id
        if not self._inside or ("name" not in a and tag != "option"):
            return
        if tag == "input":
            kind = a.get("type", "text")
            if kind in ("checkbox", "radio") and "checked" not in a:
                return
            if kind in ("submit", "button"):
                return
            self.fields.append((a["name"], a.get("value", "on" if kind == "checkbox" else "")))
        elif tag == "select":
            self._select = a["name"]
        elif tag == "option" and self._select and "selected" in a:
            self.fields.append((self._select, a.get("value", "")))
        elif tag == "textarea":
            self._textarea, self._text = a["name"], []

    def handle_data(self, data: str) -> None:
        if self._textarea:
            self._text.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._inside = False
        elif tag == "select":
            self._select = None
        elif tag == "textarea" and self._textarea:
            self.fields.append((self._textarea, "".join(self._text)))
            self._textarea = None


def read_form(html: str, form_id: str = "settings-form") -> MultiDict[str]:
    reader = FormReader(form_id)
    reader.feed(html)
    return MultiDict(reader.fields)


def csrf_in(html: str) -> str:
    return unescape(CSRF.search(html).group(1))


async def log_in(client, password: str = ADMIN_PASSWORD):
    page = await client.get("/admin/login")
    assert page.status == 200
    return await client.post(
        "/admin/login",
        data={"csrf_token": csrf_in(await page.text()), "password": password},
        allow_redirects=False,
    )


async def logged_in(start_app, **overrides: dict[str, Any]):
    client = await start_app(**overrides)
    resp = await log_in(client)
    assert resp.status == 303 and resp.headers["Location"] == "/admin"
    return client


async def page_html(client) -> str:
    resp = await client.get("/admin")
    assert resp.status == 200, resp.status
    return await resp.text()


async def submit(client, action: str, changes: dict[str, Any] | None = None, **kwargs: Any):
    """Post the settings form as the browser shows it, with ``changes`` typed in."""
    form = read_form(await page_html(client))
    for name, value in (changes or {}).items():
        form.popall(name, None)
        for item in value if isinstance(value, list) else [value]:
            form.add(name, item)
    return await client.post(action, data=form, allow_redirects=False, **kwargs)


async def stored_settings(client) -> dict[str, Any]:
    return await (await client.get("/api/settings", headers=ADMIN)).json()


def field_html(html: str, name: str) -> str:
    """The markup of one field's block on the page."""
    start = html.index(f'id="field-{name}"')
    return html[start : html.index("</div>", start)]


# Logging in


async def test_admin_root_redirects_to_the_settings_page(start_app):
    client = await start_app()
    resp = await client.get("/", allow_redirects=False)
    assert resp.status == 302 and resp.headers["Location"] == "/admin"


async def test_admin_login_page_sets_an_httponly_lax_session_cookie(start_app):
    client = await start_app()
    resp = await client.get("/admin/login")
    assert resp.status == 200
    cookie = resp.cookies[SESSION_COOKIE]
    assert cookie["httponly"] and cookie["samesite"] == "Lax" and not cookie["secure"]
    assert 'type="password"' in await resp.text()


async def test_admin_session_cookie_is_secure_when_the_public_url_is_https(start_app):
    client = await start_app(server={"public_url": "https://connector.example.com"})
    resp = await client.get("/admin/login")
    assert resp.cookies[SESSION_COOKIE]["secure"]


async def test_admin_login_with_the_password_opens_the_page(start_app):
    client = await start_app()
    resp = await log_in(client)
    assert resp.status == 303 and resp.headers["Location"] == "/admin"
    html = await page_html(client)
    for section in ("credentials", "incoming", "outgoing", "status"):
        assert f'id="{section}"' in html
    # Hull's order: credentials, incoming, outgoing mapping, status.
    positions = [html.index(f'<section class="card" id="{s}"') for s in ("credentials", "incoming")]
    positions += [html.index(f'<section class="card" id="{s}"') for s in ("outgoing", "status")]
    assert positions == sorted(positions)
    assert resp.headers.get("Cache-Control") == "no-store"


async def test_admin_login_with_a_wrong_password_fails(start_app):
    client = await start_app()
    resp = await log_in(client, "not-the-password")
    assert resp.status == 401
    assert "Wrong password" in await resp.text()
    resp = await client.get("/admin", allow_redirects=False)
    assert resp.status == 303 and resp.headers["Location"] == "/admin/login"


async def test_admin_login_without_the_csrf_token_is_refused(start_app):
    client = await start_app()
    await client.get("/admin/login")
    resp = await client.post(
        "/admin/login", data={"password": ADMIN_PASSWORD}, allow_redirects=False
    )
    assert resp.status == 403
    assert (await client.get("/admin", allow_redirects=False)).status == 303


async def test_admin_login_throttled_after_repeated_failures(start_app):
    client = await start_app()
    for _ in range(5):
        assert (await log_in(client, "wrong-password")).status == 401
    resp = await log_in(client)
    assert resp.status == 429
    assert 0 < int(resp.headers["Retry-After"]) <= 15 * 60
    assert "Too many failed attempts" in await resp.text()
    assert (await client.get("/admin", allow_redirects=False)).status == 303


def test_login_throttle_forgets_failures_after_the_window_and_on_success():
    now = [1000.0]
    throttle = LoginThrottle(max_failures=3, window_seconds=60, clock=lambda: now[0])
    for _ in range(3):
        assert throttle.retry_after("1.2.3.4") == 0
        throttle.failed("1.2.3.4")
        now[0] += 10
    assert throttle.retry_after("1.2.3.4") == 30
    assert throttle.retry_after("5.6.7.8") == 0
    now[0] += 31
    assert throttle.retry_after("1.2.3.4") == 0
    throttle.failed("1.2.3.4")
    throttle.succeeded("1.2.3.4")
    throttle.failed("1.2.3.4")
    assert throttle.retry_after("1.2.3.4") == 0


def test_login_throttle_memory_is_bounded():
    throttle = LoginThrottle(max_failures=1, max_clients=2)
    for client in ("a", "b", "c"):
        throttle.failed(client)
    assert throttle.retry_after("a") == 0
    assert throttle.retry_after("c") > 0


async def test_admin_logout_ends_the_session(start_app):
    client = await logged_in(start_app)
    html = await page_html(client)
    resp = await client.post(
        "/admin/logout", data={"csrf_token": csrf_in(html)}, allow_redirects=False
    )
    assert resp.status == 303 and resp.headers["Location"] == "/admin/login"
    assert (await client.get("/admin", allow_redirects=False)).status == 303
    assert (await client.get("/api/settings")).status == 401


# Every admin route refuses anonymous requests


@pytest.mark.parametrize(("method", "path"), PAGE_ROUTES)
async def test_admin_page_route_redirects_anonymous_to_login(start_app, method, path):
    client = await start_app()
    resp = await client.request(method, path, data={}, allow_redirects=False)
    assert resp.status == 303
    assert resp.headers["Location"] == "/admin/login"


@pytest.mark.parametrize(("method", "path"), API_ROUTES)
async def test_admin_api_route_refuses_anonymous_with_401(start_app, method, path):
    client = await start_app()
    resp = await client.request(method, path, json={})
    assert resp.status == 401
    assert resp.headers["WWW-Authenticate"].startswith("Basic")
    assert "error" in await resp.json()


async def test_admin_forged_session_cookie_is_anonymous(start_app):
    client = await start_app()
    client.session.cookie_jar.update_cookies({SESSION_COOKIE: "gAAAAABforged-token"})
    assert (await client.get("/admin", allow_redirects=False)).status == 303
    assert (await client.get("/api/settings")).status == 401


async def test_admin_session_is_accepted_by_the_api_with_csrf_for_changes(start_app):
    client = await logged_in(start_app)
    token = csrf_in(await page_html(client))
    resp = await client.get("/api/settings")
    assert resp.status == 200
    assert (await resp.json())["site_id"] == "fake-site-id"

    refused = await client.patch("/api/settings", json={"site_id": "new-site"})
    assert refused.status == 403
    wrong = await client.patch(
        "/api/settings", json={"site_id": "new-site"}, headers={"X-CSRF-Token": "nope"}
    )
    assert wrong.status == 403
    assert (await stored_settings(client))["site_id"] == "fake-site-id"

    resp = await client.patch(
        "/api/settings", json={"site_id": "new-site"}, headers={"X-CSRF-Token": token}
    )
    assert resp.status == 200
    assert (await stored_settings(client))["site_id"] == "new-site"


# CSRF on the page's forms


@pytest.mark.parametrize("token", [None, "wrong-token"], ids=["missing", "wrong"])
async def test_admin_save_without_a_valid_csrf_token_is_refused(start_app, token):
    client = await logged_in(start_app)
    form = read_form(await page_html(client))
    form.popall("csrf_token")
    if token:
        form["csrf_token"] = token
    form.popall("site_id")
    form["site_id"] = "forged-site"
    resp = await client.post("/admin/settings", data=form, allow_redirects=False)
    assert resp.status == 403
    assert (await stored_settings(client))["site_id"] == "fake-site-id"


@pytest.mark.parametrize("path", [p for m, p in PAGE_ROUTES if m == "POST"])
async def test_admin_every_form_checks_the_csrf_token(start_app, path):
    client = await logged_in(start_app)
    before = await (await client.get("/api/webhook-url", headers=ADMIN)).json()
    resp = await client.post(path, data={"csrf_token": "wrong"}, allow_redirects=False)
    assert resp.status == 403
    assert await (await client.get("/api/webhook-url", headers=ADMIN)).json() == before
    assert (await client.get("/admin", allow_redirects=False)).status == 200


# Saving


async def test_admin_save_settings_persists_them(start_app):
    client = await logged_in(start_app)
    await client.post(
        "/smart-notifier",
        json=notification(
            message("u1", segments=("seg-paying", "seg-trial"), plan="pro", events=[])
        ),
        headers=INGEST,
    )
    html = await page_html(client)
    assert "Trial" in html and 'value="plan"' in html

    resp = await submit(
        client,
        "/admin/settings",
        {
            "site_id": "site-2",
            "region": "eu",
            "user_id_mapping": "email",
            "synchronized_segments": ["", "seg-trial"],
            "synchronized_attributes": ["", "plan"],
            "synchronized_attributes_other": "traits/company, address.city",
            "events_filter": ["", "page"],
            "events_filter_other": "Signed Up",
            "enable_user_deletion": ["off", "on"],
            "anonymous_events": "off",
            "max_attributes_per_call": "50",
            "webhook_timestamp_tolerance_seconds": "600",
            "incoming_metrics_all": [],
            "incoming_metrics": "email:opened\nemail:clicked",
            "forward_event_prefix": "customerio:",
        },
    )
    assert resp.status == 303 and resp.headers["Location"] == "/admin"
    stored = await stored_settings(client)
    assert stored["site_id"] == "site-2" and stored["region"] == "eu"
    assert stored["user_id_mapping"] == "email"
    assert stored["synchronized_segments"] == ["seg-trial"]
    assert stored["synchronized_attributes"] == ["plan", "traits/company", "address.city"]
    assert stored["events_filter"] == ["page", "Signed Up"]
    assert stored["enable_user_deletion"] is True and stored["anonymous_events"] is False
    assert stored["max_attributes_per_call"] == 50
    assert stored["webhook_timestamp_tolerance_seconds"] == 600
    assert stored["incoming_metrics"] == ["email:opened", "email:clicked"]
    assert stored["forward_event_prefix"] == "customerio:"
    assert stored["api_key"] == "********"  # kept: the field was left empty

    html = await page_html(client)
    assert "Settings saved." in html
    assert re.search(r'value="seg-trial"\s+checked', html)
    assert re.search(r'value="seg-paying"\s*>', html)
    # Saved again unchanged, nothing moves.
    assert (await submit(client, "/admin/settings")).status == 303
    assert await stored_settings(client) == stored


async def test_admin_validation_errors_show_next_to_their_fields_and_save_nothing(start_app):
    client = await logged_in(start_app)
    before = await stored_settings(client)
    resp = await submit(
        client,
        "/admin/settings",
        {
            "site_id": "changed-site",
            "api_key": SECRETS["api_key"],
            "max_attributes_per_call": "0",
            "forward_url": "ftp://example.com",
        },
    )
    assert resp.status == 400
    html = await resp.text()
    assert "Nothing was saved" in html
    assert "greater than or equal to 1" in field_html(html, "max_attributes_per_call")
    assert "http:// or https:// URL" in field_html(html, "forward_url")
    assert "field-error" not in field_html(html, "site_id")
    # The entered values stay on the form, except the secret.
    assert 'value="changed-site"' in field_html(html, "site_id")
    assert SECRETS["api_key"] not in html
    assert await stored_settings(client) == before


async def test_admin_secret_fields_keep_replace_and_clear(start_app):
    client = await logged_in(start_app)
    html = await page_html(client)
    assert "leave empty to keep it" in field_html(html, "api_key")
    assert "not set" in field_html(html, "webhook_signing_key")

    await submit(client, "/admin/settings", {"webhook_signing_key": "whsec-new"})
    assert (await stored_settings(client))["webhook_signing_key"] == "********"
    await submit(client, "/admin/settings", {"clear_webhook_signing_key": "on"})
    stored = await stored_settings(client)
    assert stored["webhook_signing_key"] == "" and stored["api_key"] == "********"


async def test_admin_secrets_are_never_in_any_page(start_app):
    client = await start_app()
    resp = await client.patch("/api/settings", json=SECRETS, headers=ADMIN)
    assert resp.status == 200
    pages = [await (await client.get("/admin/login")).text()]
    pages.append(await (await log_in(client, "wrong-password")).text())
    assert (await log_in(client)).status == 303
    pages.append(await page_html(client))
    pages.append(await (await submit(client, "/admin/test-connection")).text())
    entered = {"api_key": SECRETS["api_key"], "max_attributes_per_call": "0"}
    pages.append(await (await submit(client, "/admin/settings", entered)).text())
    entered = {"api_key": SECRETS["api_key"], "site_id": "other-site"}
    pages.append(await (await submit(client, "/admin/test-connection", entered)).text())
    for html in pages:
        for secret in SECRETS.values():
            assert secret not in html
    assert "leave empty to keep it" in pages[2]


# Incoming: the webhook URL


async def test_admin_shows_the_webhook_url_and_rotation_changes_it(start_app):
    client = await logged_in(start_app, server={"public_url": "http://hooks.example.com"})
    url = (await (await client.get("/api/webhook-url", headers=ADMIN)).json())["url"]
    html = await page_html(client)
    assert f'id="webhook-url" value="{url}" readonly' in html
    assert url.startswith("http://hooks.example.com/webhook?conf=")

    token = csrf_in(html)
    resp = await client.post(
        "/admin/webhook-url/rotate", data={"csrf_token": token}, allow_redirects=False
    )
    assert resp.status == 303 and resp.headers["Location"] == "/admin#incoming"
    rotated = (await (await client.get("/api/webhook-url", headers=ADMIN)).json())["url"]
    assert rotated != url
    html = await page_html(client)
    assert f'value="{rotated}"' in html and url not in html
    assert "New webhook URL" in html


# Credentials: the connection test and the scheduled check


async def test_admin_connection_test_with_the_stored_key_succeeds_and_is_recorded(
    start_app, fake_cio
):
    client = await logged_in(start_app)
    resp = await submit(client, "/admin/test-connection")
    assert resp.status == 200
    html = await resp.text()
    assert "Connection OK." in html and "Workspace region: <strong>us</strong>" in html
    assert any(r.path == "/api/v1/accounts/region" and r.auth_ok for r in fake_cio.requests)
    assert re.search(r'id="credential-state">valid<', html)
    assert (await stored_settings(client))["site_id"] == "fake-site-id"


async def test_admin_connection_test_with_a_wrong_key_fails_and_saves_nothing(start_app):
    client = await logged_in(start_app)
    resp = await submit(client, "/admin/test-connection", {"api_key": "a-wrong-api-key"})
    assert resp.status == 200
    html = await resp.text()
    assert "Connection failed:</strong> Invalid credentials" in html
    assert "a-wrong-api-key" not in html
    # The entered key was not the stored one: the stored credentials' state is unchanged.
    assert 'id="credential-state">not checked<' in html
    status = await (await client.get("/status")).json()
    assert status["status"] != "error"


async def test_admin_connection_test_needs_credentials(start_app):
    client = await logged_in(start_app, connector={"site_id": "", "api_key": ""})
    html = await (await submit(client, "/admin/test-connection")).text()
    assert "Enter the API key to test." in field_html(html, "api_key")
    assert "Enter the Site ID to test." in field_html(html, "site_id")


async def test_credential_check_records_the_stored_credentials_verdict(start_app, fake_cio):
    client = await start_app(connector={"api_key": "revoked-key"})
    checker = client.app[runtime_key].credential_checker
    result = await checker.check_stored()
    assert result is not None and result.unauthorized
    status = await (await client.get("/status")).json()
    assert status["status"] == "error"
    assert any("Invalid credentials" in m for m in status["messages"])

    await client.patch("/api/settings", json={"api_key": fake_cio.api_key}, headers=ADMIN)
    assert (await checker.check_stored()).ok
    assert (await (await client.get("/status")).json())["status"] == "ok"


async def test_credential_check_skipped_without_credentials(start_app, fake_cio):
    client = await start_app(connector={"site_id": "", "api_key": ""})
    assert await client.app[runtime_key].credential_checker.check_stored() is None
    assert not fake_cio.requests


async def test_credential_check_runs_every_30_minutes(start_app):
    client = await start_app()
    job = client.app[runtime_key].scheduler._scheduler.get_job("credential-check")
    assert job is not None
    assert job.trigger.interval.total_seconds() == 30 * 60


# Status panel


def number(html: str, element_id: str) -> int:
    return int(re.search(rf'id="{element_id}">(\d+)<', html).group(1))


async def test_admin_status_panel_counts_syncs_and_webhooks(start_app):
    client = await logged_in(start_app)
    html = await page_html(client)
    assert 'id="run-none"' in html
    assert number(html, "users-pending") == 0

    resp = await client.post(
        "/smart-notifier",
        json=notification(message("u1", external_id="42"), message("u2", external_id="43")),
        headers=INGEST,
    )
    assert resp.status == 200
    assert number(await page_html(client), "users-pending") == 2

    resp = await client.post(
        "/admin/sync", data={"csrf_token": csrf_in(html)}, allow_redirects=False
    )
    assert resp.status == 303
    html = await page_html(client)
    assert number(html, "run-sent") == 2 and number(html, "users-pending") == 0
    assert "Sync finished: 2 sent, 0 failed." in html
    assert re.search(r'id="credential-state">valid<', html)

    path = await webhook_path(client)
    assert (await post_webhook(client, path, fixture("customer_preferences_changed.json"))).ok
    assert (await post_webhook(client, path, fixture("email_clicked.json"))).ok
    await wait_processed(client, 2)
    html = await page_html(client)
    assert re.search(r"<td>Email Link Clicked</td><td class=\"num\">1</td>", html)
    assert "Customer Subscription Preferences Changed" in html
    assert 'id="webhook-last">never' not in html
    inbound = await (await client.get("/api/inbound/stats", headers=ADMIN)).json()
    assert number(html, "webhooks-unmatched") == inbound["unmatched"]
    assert number(html, "deliveries-processed") == inbound["deliveries"]["processed"] > 0


async def test_admin_attribute_picker_shows_a_traits_attribute_once(start_app):
    client = await logged_in(
        start_app, connector={"synchronized_attributes": ["traits_salesforce_lead/title"]}
    )
    # A key stored with its prefix, as a catalog written before the prefix was dropped holds.
    async with client.app[runtime_key].sessionmaker() as session, session.begin():
        session.add(CatalogEntry(kind="attribute", key="traits_plan", last_seen_at=utcnow()))
    user = message("u1", external_id="42")
    user["user"].update({"traits_salesforce_lead/title": "CTO", "traits_plan": "pro", "plan": "x"})
    resp = await client.post("/smart-notifier", json=notification(user), headers=INGEST)
    assert resp.status == 200
    catalog = await (await client.get("/api/catalog", headers=ADMIN)).json()
    assert catalog["attributes"].count("plan") == 1 and "traits_plan" not in catalog["attributes"]
    picker = field_html(await page_html(client), "synchronized_attributes")
    values = re.findall(r'name="synchronized_attributes" value="([^"]*)"', picker)
    assert values.count("traits_salesforce_lead/title") == 1
    assert "salesforce_lead/title" not in values
    assert values.count("plan") == 1 and "traits_plan" not in values
    ticked = picker[: picker.index("traits_salesforce_lead/title")]
    assert "not seen yet" not in picker[len(ticked) : picker.index("</label>", len(ticked))]


async def test_admin_forwarding_hint_names_the_full_batch_url(start_app):
    client = await logged_in(start_app)
    hint = field_html(await page_html(client), "forward_url")
    assert "https://api.segment.io/v1/batch" in hint


async def test_admin_webhooks_panel_names_unmatched_deliveries_and_events_once(start_app):
    client = await logged_in(start_app)
    anonymous = fixture("email_sent.json")
    anonymous["data"] = {"subject": "Thanks for joining!"}
    path = await webhook_path(client)
    assert (await post_webhook(client, path, anonymous)).ok
    inbound = await wait_processed(client, 1)
    assert inbound["deliveries"] == {"unmatched": 1} and inbound["unmatched"] == 1
    html = await page_html(client)
    panel = html[html.index('id="webhooks"') : html.index('id="rotate-form"')]
    labels = [unescape(label).strip() for label in re.findall(r"<dt>(.*?)</dt>", panel)]
    assert labels == ["unmatched"]
    assert number(panel, "deliveries-unmatched") == 1
    assert "tracked events matched to no user" in panel
    assert number(panel, "webhooks-unmatched") == 1
    assert panel.lower().count("unmatched<") == 1


async def test_admin_status_panel_lists_failed_users_with_their_reason(
    start_app, fake_cio, transport
):
    client = await logged_in(start_app, sync={"max_attempts": 1})
    fake_cio.fail_next(400, **identify_requests(transport))
    await client.post("/smart-notifier", json=notification(message("u1")), headers=INGEST)
    await client.post("/api/sync?wait=1", headers=ADMIN)
    html = await page_html(client)
    assert number(html, "users-failed") == 1
    users = html[html.index('id="users"') :]
    assert '<a href="/admin/users/u1" class="user-link"><code>u1</code></a> failed' in users
    assert "HTTP 400" in users
    assert "1 user(s) failed to sync" in html


# The form's contract


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ([("api_key", "")], {}),
        ([("api_key", " new ")], {"api_key": "new"}),
        ([("api_key", ""), ("clear_api_key", "on")], {"api_key": ""}),
        ([("api_key", "new"), ("clear_api_key", "on")], {"api_key": "new"}),
        ([("anonymous_events", "off")], {"anonymous_events": False}),
        ([("anonymous_events", "off"), ("anonymous_events", "on")], {"anonymous_events": True}),
        ([("events_filter", "")], {"events_filter": []}),
        (
            [("events_filter", ""), ("events_filter", "page"), ("events_filter_other", "a, b a")],
            {"events_filter": ["page", "a", "b a"]},
        ),
        ([("incoming_metrics", "x:y"), ("incoming_metrics_all", "on")], {"incoming_metrics": None}),
        ([("incoming_metrics", "email:opened\n")], {"incoming_metrics": ["email:opened"]}),
        ([("incoming_metrics", "")], {"incoming_metrics": []}),
        ([("site_id", " s ")], {"site_id": "s"}),
    ],
)
def test_form_patch_reads_the_form_like_the_api_patch(fields, expected):
    assert form_patch(MultiDict(fields)) == expected


async def test_admin_status_panel_shows_what_is_set_aside_and_retries_it(start_app):
    client = await logged_in(start_app)
    html = await page_html(client)
    assert number(html, "held-webhooks") == 0
    assert 'id="retry-failed"' not in html

    path = await webhook_path(client)
    # An empty event_id: nothing to deduplicate it by, so it is set aside.
    webhook = {"event_id": "", "object_type": "email", "metric": "opened"}
    assert (await post_webhook(client, path, webhook)).ok
    await wait_processed(client, 1)
    html = await page_html(client)
    assert number(html, "held-webhooks") == 1
    assert "webhook(s) that could not be processed set aside" in html
    assert 'id="retry-failed"' in html

    resp = await client.post(
        "/admin/retry-failed", data={"csrf_token": csrf_in(html)}, allow_redirects=False
    )
    assert resp.status == 303
    html = await page_html(client)
    assert "Retrying 0 user(s), 1 webhook(s) and 0 forwarded event(s)." in html


# The user debugger


async def test_users_api_q_finds_a_user_by_any_of_its_ids_or_its_email(start_app):
    client = await start_app()
    await client.post(
        "/smart-notifier",
        json=notification(
            message("u1", external_id="ext-1", email="Ana@Example.com"),
            message("u2", external_id="ext-2", email="bo@example.com"),
        ),
        headers=INGEST,
    )
    for q in ("u1", "ext-1", "ana@example.com", " ANA@example.COM "):
        resp = await client.get("/api/users", params={"q": q}, headers=ADMIN)
        assert resp.status == 200
        assert [u["id"] for u in (await resp.json())["users"]] == ["u1"], q
    # The other filters still apply, together with q.
    resp = await client.get("/api/users", params={"q": "u1", "email": "x@y.z"}, headers=ADMIN)
    assert (await resp.json())["users"] == []
    resp = await client.get("/api/users", params={"q": "nobody"}, headers=ADMIN)
    assert (await resp.json())["users"] == []


async def test_admin_user_search_opens_the_user_with_what_was_sent(start_app, fake_cio):
    client = await logged_in(start_app)
    await client.patch(
        "/api/settings",
        json={"synchronized_attributes": ["bio", "first_name"], "events_filter": ["Signed Up"]},
        headers=ADMIN,
    )
    resp = await client.post(
        "/smart-notifier",
        json=notification(
            message(
                "u1",
                bio="x" * 1001,
                first_name="Ana",
                events=[event("ev-1", "Signed Up")],
            )
        ),
        headers=INGEST,
    )
    assert resp.status == 200
    html = await page_html(client)
    await client.post("/admin/sync", data={"csrf_token": csrf_in(html)})
    path = await webhook_path(client)
    assert (await post_webhook(client, path, webhook("wh-1", customer_id="ext-1"))).ok
    await wait_processed(client, 1)

    # One match: the search opens the user.
    resp = await client.get("/admin/users", params={"q": "ana@example.com"}, allow_redirects=False)
    assert resp.status == 303
    assert resp.headers["Location"] == "/admin/users/u1"
    resp = await client.get(resp.headers["Location"])
    assert resp.status == 200
    html = await resp.text()
    assert re.search(r'id="user-status">synced<', html)
    assert re.search(r'id="user-customer-id">ext-1<', html)
    assert "Paying" in html  # its segment
    sent = html[html.index('id="user-sent-attributes"') :]
    assert '<code>first_name</code></td><td>"Ana"</td>' in sent.split("</table>")[0]
    left_out = html[html.index('id="user-attribute-errors"') :].split("</table>")[0]
    assert "<code>bio</code>" in left_out and "1000" in left_out
    events = html[html.index('id="user-events"') :].split("</table>")[0]
    assert "Signed Up" in events and "<td>sent</td>" in events
    tracked = html[html.index('id="user-tracked-events"') :].split("</table>")[0]
    assert "Email Opened" in tracked and "wh-1" in tracked


async def test_admin_user_search_lists_several_matches_and_says_when_none(start_app):
    client = await logged_in(start_app)
    await client.post(
        "/smart-notifier",
        json=notification(
            message("u1", external_id="ext-1", email="shared@example.com"),
            message("u2", external_id="ext-2", email="shared@example.com"),
        ),
        headers=INGEST,
    )
    resp = await client.get("/admin/users", params={"q": "shared@example.com"})
    assert resp.status == 200
    html = await resp.text()
    links = re.findall(r'href="(/admin/users/[^"]+)" class="user-link"', html)
    assert links == ["/admin/users/u1", "/admin/users/u2"]

    html = await (await client.get("/admin/users", params={"q": "nobody"})).text()
    assert 'id="user-none"' in html
    resp = await client.get("/admin/users/nobody")
    assert resp.status == 404
    assert 'id="user-none"' in await resp.text()


async def test_admin_failed_users_link_to_the_user_debugger(start_app, fake_cio):
    client = await logged_in(start_app)
    fake_cio.fail_next(400, times=5, body={"meta": {"error": "bad attribute"}})
    await client.post("/smart-notifier", json=notification(message("cio:a@b.c")), headers=INGEST)
    html = await page_html(client)
    await client.post("/admin/sync", data={"csrf_token": csrf_in(html)})
    html = await page_html(client)
    assert '<a href="/admin/users/cio%3Aa%40b.c" class="user-link">' in html
    assert "/admin/users/{id}" in (await (await client.get("/status")).json())["messages"][0]
    html = await (await client.get("/admin/users/cio%3Aa%40b.c")).text()
    assert re.search(r'id="user-status">failed<', html)
    assert "bad attribute" in html[html.index('id="user-last-error"') :]
