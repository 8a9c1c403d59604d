"""The settings page in a real headless Chromium, against the real service in its own process.

The service (``python -m connector serve``) runs on a free port with SQLite in a temporary
directory and talks to the fake Customer.io, also in its own process. Needs Debian's
Chromium at /usr/bin/chromium (Playwright's own browser downloads are not used); without it
the tests are skipped, unless ``CONNECTOR_TEST_REQUIRE_BROWSER=1`` (set by .ci/run) turns the
skip into a failure. With ``CONNECTOR_UPDATE_SCREENSHOTS=1`` (``make screenshots``) they also
refresh the screenshots in docs/screenshots/; otherwise they take them into a temporary folder.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ..helpers import message, notification
from ..support import free_port, stop_process

ROOT = Path(__file__).resolve().parent.parent.parent
FIXTURES = Path(__file__).parent.parent / "fixtures"
DOCS_SCREENSHOTS = ROOT / "docs" / "screenshots"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
REQUIRE_ENV = "CONNECTOR_TEST_REQUIRE_BROWSER"
PASSWORD = "browser-test-password"
INGEST_TOKEN = "browser-test-ingest-token-0123456789"
API_KEY = "fake-api-key"
START_TIMEOUT = 30.0
WAIT_TIMEOUT_MS = 15_000


def _unavailable(reason: str) -> None:
    if os.environ.get(REQUIRE_ENV, "") not in ("", "0", "false"):
        pytest.fail(f"{reason} ({REQUIRE_ENV} is set)")
    pytest.skip(reason)


@dataclass
class Service:
    url: str
    fake_host: str

    def post_json(
        self,
        path_or_url: str,
        body: Any,
        headers: dict[str, str] | None = None,
        method: str = "POST",
    ):
        url = path_or_url if path_or_url.startswith("http") else self.url + path_or_url
        request = urllib.request.Request(
            url,
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", **(headers or {})},
            method=method,
        )
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, json.loads(resp.read() or b"null")


def _child_env() -> dict[str, str]:
    # The service must read only the test's TOML, not the suite's CONNECTOR_* variables.
    return {k: v for k, v in os.environ.items() if not k.startswith("CONNECTOR_")}


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    tmp = tmp_path_factory.mktemp("browser")
    fake_script = str(ROOT / "tests" / "fake_customerio.py")
    fake = subprocess.Popen(
        [sys.executable, fake_script, "--port", "0", "--ca-file", str(tmp / "ca.pem")],
        stdout=subprocess.PIPE,
        text=True,
        env=_child_env(),
    )
    try:
        ready = fake.stdout.readline().split()
        assert ready[:1] == ["ready"], f"fake Customer.io did not start: {ready}"
        fake_host, ca_file = ready[1], ready[2]
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        config = tmp / "settings.toml"
        config.write_text(
            f"""
[server]
host = "127.0.0.1"
port = {port}
public_url = "{url}"

[database]
url = "sqlite+aiosqlite:///{tmp / "connector.db"}"

[security]
admin_password = "{PASSWORD}"
ingest_token = "{INGEST_TOKEN}"

[customerio]
track_host = "{fake_host}"
ca_file = "{ca_file}"

[sync]
scheduled = true
interval_seconds = 1
# Small, so that the deletion guard's test holds a few deletions.
max_deletions_per_pass = 2

[connector]
site_id = "fake-site-id"
""",
            encoding="utf-8",
        )
        log = (tmp / "service.log").open("w")
        server = subprocess.Popen(
            [sys.executable, "-m", "connector", "--config", str(config), "serve"],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=_child_env(),
        )
        try:
            deadline = time.monotonic() + START_TIMEOUT
            while True:
                try:
                    with urllib.request.urlopen(f"{url}/healthz", timeout=1):
                        break
                except OSError:
                    if server.poll() is not None or time.monotonic() > deadline:
                        log.flush()
                        output = (tmp / "service.log").read_text()
                        pytest.fail(f"the service did not start:\n{output}")
                    time.sleep(0.1)
            yield Service(url=url, fake_host=fake_host)
        finally:
            stop_process(server)
            log.close()
    finally:
        stop_process(fake)
        fake.stdout.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not os.path.exists(CHROMIUM):
        _unavailable("install Chromium: apt-get install -y chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("install Playwright: pip install -e '.[test]'")
    with sync_playwright() as playwright:
        try:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        except Exception as exc:
            _unavailable(f"Chromium at {CHROMIUM} does not start: {exc}")
        yield browser
        browser.close()


@pytest.fixture
def page(browser, service: Service) -> Iterator[Any]:
    context = browser.new_context(
        base_url=service.url, viewport={"width": 1100, "height": 900}, device_scale_factor=1
    )
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=service.url)
    context.set_default_timeout(WAIT_TIMEOUT_MS)
    page = context.new_page()
    yield page
    context.close()


@pytest.fixture
def screenshots(tmp_path: Path) -> Path:
    """Where screenshots go: the docs when asked to update them, else a temporary folder."""
    if os.environ.get("CONNECTOR_UPDATE_SCREENSHOTS") == "1":
        return DOCS_SCREENSHOTS
    return tmp_path


def log_in(page: Any, password: str = PASSWORD) -> None:
    page.goto("/admin")
    assert page.url.endswith("/admin/login")
    page.fill("#password", password)
    page.click("button[type=submit]")


def logged_in(page: Any) -> Any:
    log_in(page)
    page.wait_for_url(re.compile(r"/admin$"))
    return page


def state(page: Any, element_id: str) -> str:
    """An element's text as written in the page (CSS may show it in capitals)."""
    return page.text_content(f"#{element_id}").strip()


def count(page: Any, element_id: str) -> int:
    return int(state(page, element_id))


def test_browser_login_fails_with_a_wrong_password(page):
    log_in(page, "not-the-password")
    assert "Wrong password." in page.inner_text("#login-error")
    page.goto("/admin")
    assert page.url.endswith("/admin/login")


def test_browser_login_opens_the_page(page):
    logged_in(page)
    headings = page.locator("section.card h2").all_inner_texts()
    assert headings == ["Credentials", "Incoming", "Outgoing mapping", "Status", "Audit log"]
    page.click("text=Log out")
    page.wait_for_url(re.compile(r"/admin/login$"))


def test_browser_saves_settings_and_they_persist(page, service: Service):
    service.post_json(
        "/smart-notifier",
        notification(message("u-seed", segments=("seg-paying", "seg-trial"), plan="pro")),
        {"Authorization": f"Bearer {INGEST_TOKEN}"},
    )
    logged_in(page)
    page.fill("#api_key", API_KEY)
    page.select_option("#region", "us")
    page.check("#field-synchronized_segments input[value=seg-paying]")
    page.check("#field-synchronized_attributes input[value=plan]")
    page.check("#field-events_filter input[value=page]")
    page.fill("#events_filter_other", "Signed Up")
    page.check("#anonymous_events")
    page.fill("#max_attributes_per_call", "40")
    page.click("#outgoing button.primary")
    page.wait_for_selector("#flash")
    assert "Settings saved." in page.inner_text("#flash")

    page.reload()
    assert page.is_checked("#field-synchronized_segments input[value=seg-paying]")
    assert not page.is_checked("#field-synchronized_segments input[value=seg-trial]")
    assert page.is_checked("#field-synchronized_attributes input[value=plan]")
    assert page.is_checked("#field-events_filter input[value='Signed Up']")
    assert page.is_checked("#anonymous_events")
    assert page.input_value("#max_attributes_per_call") == "40"
    assert page.input_value("#api_key") == ""
    assert "leave empty to keep it" in page.inner_text("#state-api_key")
    assert API_KEY not in page.content()


def test_browser_shows_a_validation_error_next_to_its_field(page):
    logged_in(page)
    before = page.input_value("#max_attributes_per_call")
    page.fill("#max_attributes_per_call", "500")
    page.fill("#site_id", "not-saved-site")
    page.click("#outgoing button.primary")
    error = page.locator("#field-max_attributes_per_call .field-error")
    error.wait_for()
    assert "less than or equal to 300" in error.inner_text()
    assert "Nothing was saved" in page.inner_text("#form-errors")
    page.goto("/admin")
    assert page.input_value("#max_attributes_per_call") == before
    assert page.input_value("#site_id") == "fake-site-id"


def test_browser_copies_and_rotates_the_webhook_url(page, service: Service, screenshots: Path):
    logged_in(page)
    url = page.input_value("#webhook-url")
    assert url.startswith(f"{service.url}/webhook?conf=")
    page.click("#copy-webhook-url")
    page.wait_for_selector("#copy-webhook-url:has-text('Copied')")
    assert page.evaluate("navigator.clipboard.readText()") == url

    page.once("dialog", lambda dialog: dialog.accept())
    page.click("#rotate-webhook-url")
    page.wait_for_selector("#flash")
    rotated = page.input_value("#webhook-url")
    assert rotated != url and rotated.startswith(f"{service.url}/webhook?conf=")
    page.locator("#incoming").screenshot(path=str(screenshots / "webhook-url.png"))


def test_browser_runs_the_connection_test_against_the_fake(page):
    logged_in(page)
    page.fill("#api_key", API_KEY)
    page.click("#credentials button.primary")
    page.wait_for_selector("#flash")
    page.click("#test-connection")
    result = page.locator("#test-result")
    result.wait_for()
    assert "Connection OK." in result.inner_text()
    assert "Workspace region: us" in result.inner_text()
    assert state(page, "credential-state") == "valid"

    page.fill("#api_key", "a-wrong-key")
    page.click("#test-connection")
    page.wait_for_selector("#test-result:has-text('Connection failed')")
    assert "Invalid credentials" in page.inner_text("#test-result")
    assert state(page, "credential-state") == "valid"


def _wait_for_count(page: Any, element_id: str, expected: int) -> None:
    deadline = time.monotonic() + WAIT_TIMEOUT_MS / 1000
    while True:
        page.reload()
        if page.locator(f"#{element_id}").count() and count(page, element_id) >= expected:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"#{element_id} never reached {expected}")
        time.sleep(0.3)


def _wait_for_a_run_that_sent(page: Any, expected: int) -> None:
    """Until *Recent runs* lists a pass that sent ``expected`` users. *Last sync* alone would
    not do: with a pass a second, the one that sent them is the last one for a second only,
    and a loaded machine's reloads can miss it."""
    deadline = time.monotonic() + WAIT_TIMEOUT_MS / 1000
    while True:
        page.reload()
        sent = page.locator("#recent-runs td.sent").all_inner_texts()
        if expected in [int(value) for value in sent]:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"no pass sent {expected} users: {sent}")
        time.sleep(0.3)


def test_browser_status_counts_change_after_a_sync_and_a_webhook(
    page, service: Service, screenshots: Path
):
    # The notification first: the page offers the segments the platform has sent (the tests
    # run in random order, so none may have been sent yet).
    service.post_json(
        "/smart-notifier",
        notification(
            message("u-browser-1", external_id="42", plan="pro"),
            message("u-browser-2", external_id="43", email="bo@example.com"),
        ),
        {"Authorization": f"Bearer {INGEST_TOKEN}"},
    )
    logged_in(page)
    page.fill("#api_key", API_KEY)
    page.check("#field-synchronized_segments input[value=seg-paying]")
    page.click("#outgoing button.primary")
    page.wait_for_selector("#flash")
    # The scheduled sync picks them up within a second or two.
    _wait_for_a_run_that_sent(page, 2)
    assert count(page, "users-pending") == 0

    webhook = page.input_value("#webhook-url")
    payload = json.loads((FIXTURES / "customer_preferences_changed.json").read_text())
    status, body = service.post_json(webhook, payload)
    assert status == 200 and body["ok"] is True
    _wait_for_count(page, "deliveries-processed", 1)
    events = page.inner_text("#webhook-events")
    assert "Customer Subscription Preferences Changed" in events
    assert page.inner_text("#webhook-last") != "never"

    page.screenshot(path=str(screenshots / "settings-page.png"), full_page=True)


def test_browser_shows_recent_runs_and_the_audit_log(page, service: Service, screenshots: Path):
    logged_in(page)
    page.fill("#api_key", API_KEY)
    page.fill("#max_attributes_per_call", "41")
    page.click("#outgoing button.primary")
    page.wait_for_selector("#flash")
    page.click("#sync-now")
    page.wait_for_selector("#flash:has-text('Sync started.')")

    # The sync is scheduled here: the page's pass runs on the schedule's job, named for the page.
    deadline = time.monotonic() + WAIT_TIMEOUT_MS / 1000
    while "page" not in page.locator("#recent-runs td.trigger").all_inner_texts():
        if time.monotonic() > deadline:
            raise AssertionError("no page pass in Recent runs")
        time.sleep(0.3)
        page.reload()
    assert page.locator("#recent-runs th").all_inner_texts()[:4] == [
        "Started",
        "Trigger",
        "Finished",
        "Sent",
    ]
    triggers = set(page.locator("#recent-runs td.trigger").all_inner_texts())
    assert "schedule" in triggers

    page.click("a[href='#audit']")
    actions = page.locator("#audit-log td.action").all_inner_texts()
    assert actions[:2] == ["sync_now", "settings_changed"]
    assert "login" in actions
    settings_row = page.locator("#audit-log tr", has_text="settings_changed").first
    assert "max_attributes_per_call" in settings_row.inner_text()
    assert "41" in settings_row.inner_text()
    assert API_KEY not in page.locator("#audit").inner_text()
    assert set(page.locator("#audit-log td.source").all_inner_texts()) == {"127.0.0.1"}
    page.locator("#audit").screenshot(path=str(screenshots / "audit-log.png"))


def test_browser_searches_a_user_and_opens_it(page, service: Service):
    service.post_json(
        "/smart-notifier",
        notification(message("u-debug-1", external_id="debug-42", email="Debug@example.com")),
        {"Authorization": f"Bearer {INGEST_TOKEN}"},
    )
    logged_in(page)
    page.fill("#user-search", "debug@EXAMPLE.com")
    page.click("#user-search-go")
    page.wait_for_url(re.compile(r"/admin/users/u-debug-1$"))
    assert state(page, "user-id") == "u-debug-1"
    assert state(page, "user-email") == "Debug@example.com"
    assert state(page, "user-external-id") == "debug-42"
    assert "Paying" in page.inner_text("#user-segments")
    # A search from the debugger itself: nothing found is said so.
    page.fill("#user-search", "nobody-at-all")
    page.click("#user-search-go")
    page.wait_for_selector("#user-none")
    assert "nobody-at-all" in page.inner_text("#user-none")


def test_browser_confirms_held_deletions(page, service: Service):
    """Last of the module: it turns deletion on. Three users leave their segment, the guard
    (max_deletions_per_pass = 2) holds their deletions, and Confirm deletions lets them go."""
    admin = {"Authorization": "Basic " + base64.b64encode(f"admin:{PASSWORD}".encode()).decode()}
    ingest = {"Authorization": f"Bearer {INGEST_TOKEN}"}
    settings = {"api_key": API_KEY, "enable_user_deletion": True}
    assert service.post_json("/api/settings", settings, admin, method="PATCH")[0] == 200
    leaving = [message(f"u-leave-{n}", external_id=f"leave-{n}") for n in range(3)]
    service.post_json("/smart-notifier", notification(*leaving), ingest)
    _wait_for(lambda: _user(service, admin, "u-leave-2")["sync"]["status"] == "synced")
    gone = [
        message(f"u-leave-{n}", external_id=f"leave-{n}", segments=("seg-trial",)) for n in range(3)
    ]
    service.post_json("/smart-notifier", notification(*gone), ingest)
    _wait_for(lambda: _user(service, admin, "u-leave-2")["sync"]["status"] == "held")

    logged_in(page)
    assert count(page, "held-deletions") == 3
    page.click("#confirm-deletions")
    page.wait_for_selector("#flash:has-text('3 deletion(s) confirmed')")
    _wait_for(lambda: _user(service, admin, "u-leave-2")["sync"]["status"] == "deleted")
    page.reload()
    assert page.locator("#confirm-deletions").count() == 0


def _user(service: Service, headers: dict[str, str], user_id: str) -> dict[str, Any]:
    request = urllib.request.Request(f"{service.url}/api/users/{user_id}", headers=headers)
    with urllib.request.urlopen(request, timeout=10) as resp:
        return json.loads(resp.read())


def _wait_for(condition) -> None:
    deadline = time.monotonic() + WAIT_TIMEOUT_MS / 1000
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("the service did not get there in time")
        time.sleep(0.2)
