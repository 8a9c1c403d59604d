"""Hardening of the settings page and the admin API through the running service: unreadable
form bodies, odd static paths, throttled HTTP Basic, logout that ends the session on every
instance, and cross-site requests refused by their ``Origin``."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select

from connector.db.kv import put_value
from connector.db.models import KeyValue
from connector.db.types import utcnow
from connector.web.keys import runtime_key
from connector.web.security import SESSION_COOKIE

from ..conftest import ADMIN, ADMIN_PASSWORD, basic_auth
from .test_admin import csrf_in, log_in, logged_in, page_html, read_form, stored_settings

WRONG = basic_auth("admin", "not-the-password")
FORM_POSTS = [
    "/admin/settings",
    "/admin/test-connection",
    "/admin/webhook-url/rotate",
    "/admin/sync",
    "/admin/logout",
]
UNREADABLE_FORMS = {
    "unknown charset": (
        "application/x-www-form-urlencoded; charset=nope",
        b"csrf_token=x&password=y",
    ),
    "invalid utf-8": ("application/x-www-form-urlencoded", b"csrf_token=\xff\xfe&password=\xc3"),
    "multipart without boundary": ("multipart/form-data", b"csrf_token=x&password=y"),
    "multipart with a bad part charset": (
        "multipart/form-data; boundary=b",
        b'--b\r\nContent-Disposition: form-data; name="csrf_token"\r\n'
        b"Content-Type: text/plain; charset=nope\r\n\r\nx\r\n--b--\r\n",
    ),
    "multipart with an unknown transfer encoding": (
        "multipart/form-data; boundary=b",
        b'--b\r\nContent-Disposition: form-data; name="csrf_token"\r\n'
        b"Content-Transfer-Encoding: weird\r\n\r\nx\r\n--b--\r\n",
    ),
}


async def webhook_url(client) -> str:
    return (await (await client.get("/api/webhook-url", headers=ADMIN)).json())["url"]


# Form bodies that cannot be read


@pytest.mark.parametrize(("content_type", "body"), UNREADABLE_FORMS.values(), ids=UNREADABLE_FORMS)
async def test_admin_login_with_an_unreadable_form_is_400_and_logs_nobody_in(
    start_app, content_type, body
):
    client = await start_app()
    await client.get("/admin/login")
    resp = await client.post(
        "/admin/login", data=body, headers={"Content-Type": content_type}, allow_redirects=False
    )
    assert resp.status == 400
    html = await resp.text()
    assert "The form could not be read" in html and 'type="password"' in html
    assert (await client.get("/admin", allow_redirects=False)).status == 303


@pytest.mark.parametrize("path", FORM_POSTS)
@pytest.mark.parametrize(("content_type", "body"), UNREADABLE_FORMS.values(), ids=UNREADABLE_FORMS)
async def test_admin_forms_with_an_unreadable_body_are_400_and_change_nothing(
    start_app, path, content_type, body
):
    client = await logged_in(start_app)
    before = (await webhook_url(client), await stored_settings(client))
    resp = await client.post(
        path, data=body, headers={"Content-Type": content_type}, allow_redirects=False
    )
    assert resp.status == 400
    assert "The form could not be read" in await resp.text()
    assert (await webhook_url(client), await stored_settings(client)) == before
    assert (await client.get("/admin", allow_redirects=False)).status == 200


# Static files


@pytest.mark.parametrize(
    "name",
    [
        "a" * 300,
        "a/" * 2000 + "admin.css",
        "%00",
        "admin.css%00",
        "a%00b/admin.css",
        "admin.css/x",
        "..%2F..%2Fsettings.py",
        "%2e%2e/__init__.py",
        "missing.css",
    ],
    ids=lambda name: name[:20],
)
async def test_admin_static_odd_paths_are_404(start_app, name):
    client = await start_app()
    resp = await client.get(f"/static/admin/{name}")
    # A NUL anywhere in a URL is refused before routing (see connector.web.errors.edge).
    assert resp.status == (400 if "%00" in name else 404)
    assert (await client.get("/static/admin/admin.css")).status == 200


# HTTP Basic is throttled like the login form, by the same counter


async def test_admin_basic_auth_throttled_after_repeated_failures_even_with_the_password(
    start_app,
):
    client = await start_app()
    for _ in range(5):
        assert (await client.get("/api/settings", headers=WRONG)).status == 401
    resp = await client.get("/api/settings", headers=ADMIN)
    assert resp.status == 429
    assert 0 < int(resp.headers["Retry-After"]) <= 15 * 60
    assert "too many failed" in (await resp.json())["error"]
    changed = await client.patch("/api/settings", json={"site_id": "x"}, headers=ADMIN)
    assert changed.status == 429
    # One counter for both ways of giving the password.
    assert (await log_in(client)).status == 429


async def test_admin_login_form_failures_throttle_basic_auth_too(start_app):
    client = await start_app()
    for _ in range(5):
        assert (await log_in(client, "wrong-password")).status == 401
    assert (await client.get("/api/settings", headers=ADMIN)).status == 429


async def test_admin_basic_auth_success_forgets_failures(start_app):
    client = await start_app()
    for _ in range(4):
        assert (await client.get("/api/settings", headers=WRONG)).status == 401
    assert (await client.get("/api/settings", headers=ADMIN)).status == 200
    for _ in range(4):
        assert (await client.get("/api/settings", headers=WRONG)).status == 401
    assert (await client.get("/api/settings", headers=ADMIN)).status == 200


async def test_admin_throttled_address_keeps_its_logged_in_session(start_app):
    client = await logged_in(start_app)
    for _ in range(5):
        await client.get("/api/settings", headers=WRONG)
    assert (await client.get("/api/settings", headers=ADMIN)).status == 429
    assert (await client.get("/api/settings")).status == 200


# Logging out ends the session everywhere


def session_cookie(client) -> str:
    return next(c.value for c in client.session.cookie_jar if c.key == SESSION_COOKIE)


async def with_cookie(start_app, config, cookie: str):
    """Another instance on the same database, presenting a copied session cookie."""
    other = await start_app(config)
    other.session.cookie_jar.update_cookies({SESSION_COOKIE: cookie})
    return other


async def test_admin_logout_revokes_a_copied_session_cookie_on_every_instance(
    start_app, make_config
):
    config = make_config()
    client = await start_app(config)
    assert (await log_in(client)).status == 303
    token = csrf_in(await page_html(client))
    copied = session_cookie(client)
    other = await with_cookie(start_app, config, copied)
    assert (await other.get("/admin", allow_redirects=False)).status == 200

    resp = await client.post("/admin/logout", data={"csrf_token": token}, allow_redirects=False)
    assert resp.status == 303

    for instance in (client, other):
        instance.session.cookie_jar.update_cookies({SESSION_COOKIE: copied})
        assert (await instance.get("/admin", allow_redirects=False)).status == 303
        assert (await instance.get("/api/settings")).status == 401
        refused = await instance.patch(
            "/api/settings", json={"site_id": "stolen"}, headers={"X-CSRF-Token": token}
        )
        assert refused.status == 401
    assert (await stored_settings(client))["site_id"] == "fake-site-id"
    # Logging in again gives a new session that works.
    assert (await log_in(client)).status == 303
    assert (await client.get("/admin", allow_redirects=False)).status == 200


async def test_admin_session_stays_valid_on_another_instance_until_logout(start_app, make_config):
    config = make_config()
    client = await start_app(config)
    assert (await log_in(client)).status == 303
    other = await with_cookie(start_app, config, session_cookie(client))
    html = await page_html(other)
    resp = await other.post(
        "/admin/webhook-url/rotate", data={"csrf_token": csrf_in(html)}, allow_redirects=False
    )
    assert resp.status == 303
    assert (await client.get("/admin", allow_redirects=False)).status == 200


async def revocations(client) -> list[str]:
    async with client.app[runtime_key].sessionmaker() as db:
        keys = await db.scalars(select(KeyValue.key).where(KeyValue.key.like("revoked-session:%")))
        return list(keys)


async def test_admin_expired_revocations_are_purged_at_logout(start_app):
    client = await logged_in(start_app)
    async with client.app[runtime_key].sessionmaker() as db, db.begin():
        await put_value(db, "revoked-session:long-gone", {})
        row = await db.get(KeyValue, "revoked-session:long-gone")
        row.updated_at = utcnow() - timedelta(hours=13)
    token = csrf_in(await page_html(client))
    await client.post("/admin/logout", data={"csrf_token": token}, allow_redirects=False)
    remaining = await revocations(client)
    assert len(remaining) == 1 and "revoked-session:long-gone" not in remaining


# Cross-site requests


async def _form_post(client, path: str, headers: dict[str, str]) -> Any:
    form = read_form(await page_html(client))
    return await client.post(path, data=form, headers=headers, allow_redirects=False)


async def _api_patch(client, path: str, headers: dict[str, str]) -> Any:
    token = csrf_in(await page_html(client))
    return await client.patch(
        "/api/settings", json={"site_id": "forged"}, headers={"X-CSRF-Token": token, **headers}
    )


async def _api_rotate(client, path: str, headers: dict[str, str]) -> Any:
    token = csrf_in(await page_html(client))
    return await client.post(path, headers={"X-CSRF-Token": token, **headers})


async def _basic_rotate(client, path: str, headers: dict[str, str]) -> Any:
    return await client.post(path, headers={**ADMIN, **headers})


STATE_CHANGES = {
    "save form": ("/admin/settings", _form_post),
    "rotate form": ("/admin/webhook-url/rotate", _form_post),
    "sync form": ("/admin/sync", _form_post),
    "logout form": ("/admin/logout", _form_post),
    "api patch with session": ("/api/settings", _api_patch),
    "api rotate with session": ("/api/webhook-url/rotate", _api_rotate),
    "api rotate with basic": ("/api/webhook-url/rotate", _basic_rotate),
}


@pytest.mark.parametrize(
    "origin", ["https://evil.example", "null", "http://127.0.0.1:1"], ids=["other", "null", "port"]
)
@pytest.mark.parametrize(("path", "send"), STATE_CHANGES.values(), ids=STATE_CHANGES)
async def test_admin_cross_site_origin_is_refused_and_changes_nothing(
    start_app, path, send, origin
):
    client = await logged_in(start_app)
    before = (await webhook_url(client), await stored_settings(client))
    resp = await send(client, path, {"Origin": origin})
    assert resp.status == 403
    assert "cross-site" in (await resp.text()).lower()
    assert (await webhook_url(client), await stored_settings(client)) == before
    assert (await client.get("/admin", allow_redirects=False)).status == 200


async def test_admin_cross_site_login_is_refused(start_app):
    client = await start_app()
    page = await client.get("/admin/login")
    resp = await client.post(
        "/admin/login",
        data={"csrf_token": csrf_in(await page.text()), "password": ADMIN_PASSWORD},
        headers={"Origin": "https://evil.example"},
        allow_redirects=False,
    )
    assert resp.status == 403
    assert (await client.get("/admin", allow_redirects=False)).status == 303


@pytest.mark.parametrize("origin", ["host", "public_url", None], ids=["host", "public", "absent"])
@pytest.mark.parametrize(("path", "send"), STATE_CHANGES.values(), ids=STATE_CHANGES)
async def test_admin_same_origin_or_no_origin_is_allowed(start_app, path, send, origin):
    client = await logged_in(start_app, server={"public_url": "http://connector.example.com/"})
    headers = {
        "host": {"Origin": str(client.make_url("/").origin())},
        "public_url": {"Origin": "http://connector.example.com"},
        None: {},
    }[origin]
    resp = await send(client, path, headers)
    assert resp.status in (200, 202, 303), await resp.text()


async def test_admin_safe_methods_ignore_the_origin(start_app):
    client = await logged_in(start_app)
    resp = await client.get("/admin", headers={"Origin": "https://evil.example"})
    assert resp.status == 200
