"""The ``connector`` command end to end, each call a real subprocess.

The settings TOML each test writes points at the test database (SQLite, then PostgreSQL) and
at the fake Customer.io. The fake serves on this test's event loop, so the CLI is awaited with
``asyncio.create_subprocess_exec``; a blocking ``subprocess.run`` would starve the fake.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import os
import re
import signal
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
from sqlalchemy import select

from connector.config import load_config
from connector.db import migrate
from connector.db.engine import make_engine
from connector.db.models import TrackedEvent, User, WebhookDelivery
from connector.db.types import utcnow
from connector.notifications.parse import parse_notification
from connector.notifications.store import store_messages
from connector.runtime import open_runtime

from .conftest import ADMIN, ADMIN_PASSWORD, INGEST_TOKEN
from .helpers import event, message, webhook
from .track_calls import operations, requests_made

EXAMPLE_SETTINGS = Path(__file__).resolve().parent.parent / "settings.example.toml"
CLI_TIMEOUT_SECONDS = 60
SUMMARY = re.compile(r"sent (\d+), skipped (\d+), deleted (\d+), failed (\d+)")
BOTH_TRANSPORTS = pytest.mark.parametrize("transport", ["batch", "single"])
"""For a test that sends: ``settings_file`` writes ``sync.transport``."""


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    # JSON strings and lists of strings are valid TOML too.
    return json.dumps(value)


def write_toml(path: Path, sections: dict[str, dict[str, Any]]) -> Path:
    lines: list[str] = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in values.items())
        lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


@pytest.fixture
def settings_file(tmp_path: Path, db_url: str, fake_cio, transport: str):
    """Write ``settings.toml`` on the test database and the fake, with the ``transport``
    fixture's ``sync.transport``; ``connector=`` overrides."""

    def write(**connector: Any) -> Path:
        seed: dict[str, Any] = {
            "site_id": fake_cio.site_id,
            "api_key": fake_cio.api_key,
            "synchronized_segments": ["seg-paying"],
            "synchronized_attributes": ["first_name", "plan"],
            "events_filter": ["Signed Up"],
        }
        seed.update(connector)
        seed = {key: value for key, value in seed.items() if value is not None}
        return write_toml(
            tmp_path / "settings.toml",
            {
                "database": {"url": db_url},
                "security": {"admin_password": ADMIN_PASSWORD, "ingest_token": INGEST_TOKEN},
                "customerio": {"track_host": fake_cio.host, "ca_file": fake_cio.ca_file},
                "sync": {
                    "backoff_base_seconds": 0.01,
                    "backoff_max_seconds": 0.05,
                    "transport": transport,
                },
                "connector": seed,
            },
        )

    return write


async def run_cli(
    config: Path, *args: str, cwd: Path | None = None, environ: dict[str, str] | None = None
) -> CliResult:
    """``python -m connector --config CONFIG ARGS`` in a clean environment (plus ``environ``),
    awaited."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("CONNECTOR_")}
    env.update(environ or {})
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "connector",
        "--config",
        str(config),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        cwd=cwd or config.parent,
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), CLI_TIMEOUT_SECONDS)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    return CliResult(process.returncode, stdout.decode(), stderr.decode())


def write_jsonl(path: Path, lines: list[Any]) -> Path:
    """One line per item: dicts as JSON, strings as they are (for malformed lines)."""
    text = "\n".join(item if isinstance(item, str) else json.dumps(item) for item in lines)
    path.write_text(text + "\n", encoding="utf-8")
    return path


async def stored_users(config_path: Path) -> dict[str, User]:
    config = load_config(config_path, environ={})
    async with open_runtime(config) as runtime, runtime.sessionmaker() as session:
        users = (await session.scalars(select(User))).all()
    return {user.id: user for user in users}


def summary_counts(stdout: str) -> tuple[int, int, int, int]:
    match = SUMMARY.search(stdout)
    assert match, stdout
    sent, skipped, deleted, failed = (int(n) for n in match.groups())
    return sent, skipped, deleted, failed


GOOD_USERS = [
    message("u1", external_id="ext-1", email="ana@example.com", first_name="Ana", plan="pro"),
    message(
        "u2",
        external_id="ext-2",
        email="bo@example.com",
        first_name="Bo",
        events=[event("ev-1", "Signed Up", properties={"plan": "free"})],
    ),
    message("u3", external_id="ext-3", email="cy@example.com", first_name="Cy"),
]


async def import_good_users(settings: Path, tmp_path: Path) -> None:
    result = await run_cli(settings, "import", str(write_jsonl(tmp_path / "ok.jsonl", GOOD_USERS)))
    assert result.code == 0, result.stderr


# -- init and configuration --------------------------------------------------------------


async def test_cli_version_prints_the_package_version(tmp_path):
    result = await run_cli(tmp_path / "settings.toml", "--version")
    assert result.code == 0, result.stderr
    assert result.stdout.strip().endswith(importlib.metadata.version("customerio-connector"))
    assert result.stdout.startswith("connector")


async def test_cli_init_writes_settings_with_a_generated_password(tmp_path):
    target = tmp_path / "settings.toml"
    result = await run_cli(target, "init")
    assert result.code == 0, result.stderr
    text = target.read_text(encoding="utf-8")
    (password,) = re.findall(r'^admin_password = "(.+)"$', text, re.MULTILINE)
    assert len(password) >= 16
    assert password in result.stdout
    # Only the generated secrets differ from the example; everything else is copied as is.
    example = EXAMPLE_SETTINGS.read_text(encoding="utf-8").splitlines()
    written = text.splitlines()
    assert len(written) == len(example)
    differing = [(a, b) for a, b in zip(example, written, strict=True) if a != b]
    assert ('admin_password = ""', f'admin_password = "{password}"') in differing
    assert all(re.match(r"#?\s*(admin_password|ingest_token) = ", a) for a, _ in differing)
    config = load_config(target, environ={})
    assert config.security.admin_password == password
    if config.security.ingest_token:
        assert config.security.ingest_token in result.stdout


async def test_cli_init_leaves_an_existing_file_alone(tmp_path):
    target = tmp_path / "settings.toml"
    target.write_text("# mine\n", encoding="utf-8")
    result = await run_cli(target, "init")
    assert result.code == 0
    assert "exists" in result.stdout
    assert target.read_text(encoding="utf-8") == "# mine\n"


async def test_cli_init_passwords_differ_between_files(tmp_path):
    first, second = tmp_path / "a.toml", tmp_path / "b.toml"
    await run_cli(first, "init")
    await run_cli(second, "init")
    assert load_config(first, environ={}).security.admin_password != (
        load_config(second, environ={}).security.admin_password
    )


async def test_cli_invalid_config_exits_2_naming_every_bad_key(tmp_path):
    config = write_toml(
        tmp_path / "settings.toml",
        {
            "server": {"port": 70000},
            "database": {"url": "mysql://db/connector"},
            "security": {"admin_password": "short"},
            "customerio": {"track_host": "https://track.customer.io/"},
            "sync": {"concurrency": 0, "no_such_key": 1},
            "connector": {"region": "mars", "max_attributes_per_call": 301},
        },
    )
    result = await run_cli(config, "migrate")
    assert result.code == 2
    for key in (
        "server.port",
        "database.url",
        "security.admin_password",
        "customerio.track_host",
        "sync.concurrency",
        "sync.no_such_key",
        "connector.region",
        "connector.max_attributes_per_call",
    ):
        assert key in result.stderr, key
    assert "Traceback" not in result.stderr


async def test_cli_misspelt_variable_is_warned_about_and_the_command_runs(settings_file):
    environ = {
        "CONNECTOR_DATABSE_URL": "sqlite+aiosqlite:///elsewhere.db",
        "CONNECTOR_TEST_ANYTHING": "1",
        "CONNECTOR_UPDATE_SCREENSHOTS": "1",
    }
    result = await run_cli(settings_file(), "ingest-token", environ=environ)
    assert result.code == 0, result.stderr
    assert result.stdout.strip() == INGEST_TOKEN
    assert result.stderr == (
        "warning: CONNECTOR_DATABSE_URL names no setting and is ignored"
        " (did you mean CONNECTOR_DATABASE_URL?)\n"
    )


async def test_cli_config_without_admin_password_exits_2(tmp_path):
    config = write_toml(tmp_path / "settings.toml", {"server": {"port": 8081}})
    result = await run_cli(config, "sync", "--dry-run")
    assert result.code == 2
    assert "security" in result.stderr


async def test_cli_unreadable_toml_exits_2(tmp_path):
    config = tmp_path / "settings.toml"
    config.write_text("[server\nport = ", encoding="utf-8")
    result = await run_cli(config, "migrate")
    assert result.code == 2
    assert str(config) in result.stderr


async def test_cli_missing_config_file_exits_2(tmp_path):
    result = await run_cli(tmp_path / "nowhere.toml", "migrate")
    assert result.code == 2
    assert "no such file" in result.stderr


# -- serve --------------------------------------------------------------------------------


def serve_settings(tmp_path: Path, port: int, **server: Any) -> Path:
    """Settings of a ``serve`` on ``port`` with a fresh SQLite file (``serve`` migrates it)."""
    return write_toml(
        tmp_path / "settings.toml",
        {
            "server": {"port": port, **server},
            "database": {"url": f"sqlite+aiosqlite:///{tmp_path / 'serve.db'}"},
            "security": {"admin_password": ADMIN_PASSWORD, "ingest_token": INGEST_TOKEN},
            "sync": {"scheduled": False},
        },
    )


async def test_cli_serve_on_a_port_in_use_exits_1_with_one_line_and_starts_nothing(tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as holder:
        port = holder.getsockname()[1]
        result = await run_cli(serve_settings(tmp_path, port), "serve")
    assert result.code == 1
    assert result.stderr == f"error: cannot listen on 127.0.0.1:{port}: address already in use\n"
    assert "listening" not in result.stdout
    assert not (tmp_path / "serve.db").exists()


def access_lines(stderr: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    return [line for line in lines if line["logger"] == "aiohttp.access"]


@pytest.mark.parametrize("access_log", [False, True], ids=["quiet", "access-log"])
async def test_cli_serve_answers_on_its_port_until_interrupted(tmp_path, access_log):
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    config = serve_settings(tmp_path, port, access_log=access_log)
    process = await start_serve(config, tmp_path)
    try:
        await wait_answering(port)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/api/webhook-url", headers=ADMIN) as resp:
                url = (await resp.json())["url"]
            async with http.post(url, json=webhook("logged", customer_id="c1")) as resp:
                assert resp.status == 200
    finally:
        process.send_signal(signal.SIGINT)
        stdout, stderr = await asyncio.wait_for(process.communicate(), CLI_TIMEOUT_SECONDS)
    assert process.returncode == 0, stderr.decode()
    # uvloop is a dependency wherever it builds (not on Windows).
    assert "Event loop: uvloop\n" in stdout.decode()
    requests = access_lines(stderr.decode())
    token = parse_qs(urlsplit(url).query)["conf"][0]
    # The token lets anyone post webhooks: it is never in the log.
    assert token not in stderr.decode()
    if access_log:
        assert any(
            "GET /healthz" in line["message"] and line["level"] == "INFO" for line in requests
        )
        assert any("POST /webhook?conf=redacted " in line["message"] for line in requests)
        assert all(line["time"].endswith("Z") for line in requests)
    else:
        assert requests == []


async def start_serve(config: Path, cwd: Path, *options: str) -> asyncio.subprocess.Process:
    """``connector serve`` in a process of its own, outside this environment's settings; the
    caller stops it (SIGINT) and reads its output with ``communicate()``."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("CONNECTOR_")}
    return await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "connector", "--config", str(config), "serve", *options),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        cwd=cwd,
    )


async def wait_answering(port: int) -> None:
    async with aiohttp.ClientSession() as http:
        for _ in range(CLI_TIMEOUT_SECONDS * 10):
            try:
                async with http.get(f"http://127.0.0.1:{port}/healthz") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.1)
    pytest.fail("serve never answered")


async def test_cli_serve_with_two_workers_answers_from_both_and_processes_each_webhook_once(
    tmp_path, db_url
):
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    config = write_toml(
        tmp_path / "settings.toml",
        {
            "server": {"port": port, "access_log": True},
            "database": {"url": db_url},
            "security": {"admin_password": ADMIN_PASSWORD, "ingest_token": INGEST_TOKEN},
            "sync": {"scheduled": False},
        },
    )
    process = await start_serve(config, tmp_path, "--workers", "2")
    event_ids = [f"worker-test-{i}" for i in range(40)]
    try:
        await wait_answering(port)
        # A connection per request: the kernel spreads connections over the workers' sockets.
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as http:
            async with http.get(f"http://127.0.0.1:{port}/api/webhook-url", headers=ADMIN) as resp:
                url = (await resp.json())["url"]
            for event_id in event_ids:
                async with http.post(url, json=webhook(event_id, customer_id=event_id)) as resp:
                    assert resp.status == 200
                    assert await resp.json() == {"ok": True}
            async with http.post(url, json=webhook(event_ids[0])) as resp:
                assert await resp.json() == {"ok": True, "duplicate": True}
        async with open_runtime(load_config(config, environ={})) as runtime:
            for _ in range(CLI_TIMEOUT_SECONDS * 10):
                async with runtime.sessionmaker() as session:
                    statuses = (await session.scalars(select(WebhookDelivery.status))).all()
                if statuses.count("processed") == len(event_ids):
                    break
                await asyncio.sleep(0.1)
            async with runtime.sessionmaker() as session:
                tracked = (await session.scalars(select(TrackedEvent.event_id))).all()
        assert sorted(statuses) == ["processed"] * len(event_ids)
        assert sorted(tracked) == sorted(event_ids)
    finally:
        process.send_signal(signal.SIGINT)
        _, stderr = await asyncio.wait_for(process.communicate(), CLI_TIMEOUT_SECONDS)
    assert process.returncode == 0, stderr.decode()
    answered_by = {
        line["process"]
        for line in access_lines(stderr.decode())
        if "POST /webhook" in line["message"]
    }
    assert len(answered_by) == 2
    assert process.pid not in answered_by


# -- migrate and import ------------------------------------------------------------------


async def test_cli_migrate_prints_the_revision(settings_file):
    result = await run_cli(settings_file(), "migrate")
    assert result.code == 0, result.stderr
    assert f"revision {migrate.head_revision()}" in result.stdout


async def test_cli_migrate_creates_a_fresh_sqlite_database(tmp_path):
    database = tmp_path / "fresh.db"
    config = write_toml(
        tmp_path / "settings.toml",
        {
            "database": {"url": f"sqlite+aiosqlite:///{database}"},
            "security": {"admin_password": ADMIN_PASSWORD},
        },
    )
    result = await run_cli(config, "migrate")
    assert result.code == 0, result.stderr
    assert database.exists()
    assert await stored_users(config) == {}


async def test_cli_import_stores_good_lines_and_reports_bad_ones(settings_file, tmp_path):
    settings = settings_file()
    users = write_jsonl(
        tmp_path / "users.jsonl",
        [
            GOOD_USERS[0],
            '{"user": {"id": "u-broken", ',
            GOOD_USERS[1],
            {"user": {"first_name": "Nobody"}},
            "",
            GOOD_USERS[2],
            {"user": {"id": "u9"}, "events": "Signed Up"},
        ],
    )
    result = await run_cli(settings, "import", str(users))
    assert result.code == 1
    assert "3 users stored" in result.stdout
    assert "3 lines rejected" in result.stdout
    rejected = {
        int(m.group(1)): m.group(2) for m in re.finditer(r"^line (\d+): (.*)$", result.stderr, re.M)
    }
    assert sorted(rejected) == [2, 4, 7]
    assert "malformed JSON" in rejected[2]
    assert "'id', 'external_id' and 'email'" in rejected[4]
    assert "'events'" in rejected[7]

    stored = await stored_users(settings)
    assert sorted(stored) == ["u1", "u2", "u3"]
    assert all(user.pending for user in stored.values())
    assert stored["u1"].attributes["plan"] == "pro"


async def test_cli_import_of_an_all_good_file_exits_0(settings_file, tmp_path):
    settings = settings_file()
    users = write_jsonl(tmp_path / "users.jsonl", GOOD_USERS)
    result = await run_cli(settings, "import", str(users))
    assert result.code == 0, result.stderr
    assert "3 users stored and marked pending, 0 lines rejected" in result.stdout
    assert sorted(await stored_users(settings)) == ["u1", "u2", "u3"]


@BOTH_TRANSPORTS
async def test_cli_import_treats_lines_like_batch_and_ignores_segments(
    settings_file, tmp_path, fake_cio
):
    settings = settings_file()
    outsider = message("u4", external_id="ext-4", segments=("seg-other",))
    await run_cli(settings, "import", str(write_jsonl(tmp_path / "u.jsonl", [outsider])))
    result = await run_cli(settings, "sync", "--once")
    assert result.code == 0, result.stderr
    assert summary_counts(result.stdout)[0] == 1
    assert "ext-4" in fake_cio.customers


# -- sync --------------------------------------------------------------------------------


@BOTH_TRANSPORTS
async def test_cli_sync_dry_run_prints_the_plan_and_sends_nothing(
    settings_file, tmp_path, fake_cio, transport
):
    settings = settings_file()
    await import_good_users(settings, tmp_path)
    result = await run_cli(settings, "sync", "--dry-run")
    assert result.code == 0, result.stderr
    out = result.stdout
    assert "user u1: send" in out
    assert re.search(r"identify ext-1: \d+ attributes", out)
    assert '    first_name = "Ana"' in out
    assert '    plan = "pro"' in out
    assert '    email = "ana@example.com"' in out
    assert "event 'Signed Up' for ext-2" in out
    assert '    data.plan = "free"' in out
    assert "3 pending users: 3 identify, 1 event, 0 delete, 0 skip" in out
    # 3 identify calls and 1 event: one batch request, or one v1 call each.
    requests = {"batch": 1, "single": 4}[transport]
    assert (
        f"0 deletions would be held; {requests} Track API requests ({transport} transport); "
        "nothing was sent"
    ) in out
    assert fake_cio.api_key not in out
    assert fake_cio.requests == []
    assert all(user.pending for user in (await stored_users(settings)).values())


@BOTH_TRANSPORTS
async def test_cli_sync_dry_run_full_plans_every_user_and_limit_shows_the_first(
    settings_file, tmp_path, fake_cio
):
    settings = settings_file()
    await import_good_users(settings, tmp_path)
    assert (await run_cli(settings, "sync", "--once")).code == 0
    fake_cio.reset()

    plain = await run_cli(settings, "sync", "--dry-run")
    full = await run_cli(settings, "sync", "--dry-run", "--full", "--limit", "1")

    assert "0 pending users" in plain.stdout
    assert full.code == 0, full.stderr
    assert "3 users (every user: --full): 3 identify" in full.stdout
    assert full.stdout.count("user u") == 1
    assert "2 more users not shown (--limit)" in full.stdout
    assert fake_cio.requests == []


def deletion_settings(settings_file, limit: int) -> Path:
    path = settings_file(enable_user_deletion=True)
    text = path.read_text(encoding="utf-8")
    path.write_text(text.replace("[sync]\n", f"[sync]\nmax_deletions_per_pass = {limit}\n"))
    return path


@BOTH_TRANSPORTS
async def test_cli_import_then_full_sync_deletes_nobody_outside_the_segments(
    settings_file, tmp_path, fake_cio
):
    """The issue's reproduction (300 users for 3,000): an import of which a third are outside
    the whitelisted segments, then ``sync --once --full``: nobody is deleted."""
    settings = deletion_settings(settings_file, 100)
    lines = [
        message(f"u{n}", external_id=f"ext-{n}", segments=("seg-paying",) if n % 3 else ())
        for n in range(300)
    ]
    users_file = write_jsonl(tmp_path / "users.jsonl", lines)
    preview = await run_cli(settings, "import", "--dry-run", str(users_file))
    assert preview.code == 0, preview.stderr
    assert "300 users would be sent, 0 skipped, 0 deleted" in preview.stdout
    assert await stored_users(settings) == {}
    assert (await run_cli(settings, "import", str(users_file))).code == 0
    assert (await run_cli(settings, "sync", "--once")).code == 0

    dry = await run_cli(settings, "sync", "--dry-run", "--full")
    result = await run_cli(settings, "sync", "--once", "--full")

    assert "300 users (every user: --full): 200 identify, 0 event, 0 delete, 100 skip" in (
        dry.stdout
    )
    assert result.code == 0, result.stderr
    assert summary_counts(result.stdout)[2] == 0
    assert operations(fake_cio, "delete") == []


@BOTH_TRANSPORTS
async def test_cli_sync_holds_deletions_over_the_limit_until_confirmed(
    settings_file, tmp_path, fake_cio
):
    settings = deletion_settings(settings_file, 2)
    inside = [message(f"u{n}", external_id=f"ext-{n}") for n in range(3)]
    await run_cli(settings, "import", str(write_jsonl(tmp_path / "a.jsonl", inside)))
    assert (await run_cli(settings, "sync", "--once")).code == 0
    config = load_config(settings, environ={})
    async with open_runtime(config) as runtime:
        left = [message(f"u{n}", external_id=f"ext-{n}", segments=()) for n in range(3)]
        parsed = parse_notification({"messages": left})
        await store_messages(runtime.sessionmaker, parsed.messages, via_batch=False)

    dry = await run_cli(settings, "sync", "--dry-run")
    held = await run_cli(settings, "sync", "--once")

    assert "user u0: delete (held by the deletion guard)" in dry.stdout
    assert "3 delete, 0 skip; 3 deletions would be held" in dry.stdout
    assert "deletions held 3" in held.stdout
    assert operations(fake_cio, "delete") == []
    assert {user.sync_status for user in (await stored_users(settings)).values()} == {"held"}

    confirmed = await run_cli(settings, "sync", "--confirm-deletions")

    assert confirmed.code == 0, confirmed.stderr
    assert "3 held deletions confirmed." in confirmed.stdout
    assert summary_counts(confirmed.stdout)[2] == 3
    assert len(operations(fake_cio, "delete")) == 3


@BOTH_TRANSPORTS
async def test_cli_sync_once_sends_the_imported_users(settings_file, tmp_path, fake_cio, transport):
    settings = settings_file()
    await import_good_users(settings, tmp_path)
    result = await run_cli(settings, "sync", "--once")
    assert result.code == 0, result.stderr
    assert summary_counts(result.stdout) == (3, 0, 0, 0)
    assert "1 events" in result.stdout
    assert sorted(fake_cio.customers) == ["ext-1", "ext-2", "ext-3"]
    assert fake_cio.customers["ext-1"]["plan"] == "pro"
    assert [(e["customer_id"], e["name"]) for e in fake_cio.events] == [("ext-2", "Signed Up")]
    stored = await stored_users(settings)
    assert not any(user.pending for user in stored.values())
    assert {user.sync_status for user in stored.values()} == {"synced"}

    again = await run_cli(settings, "sync", "--once")
    assert again.code == 0, again.stderr
    assert summary_counts(again.stdout) == (0, 0, 0, 0)
    assert len(operations(fake_cio, "identify")) == 3
    # Batch: the three users and the event in one request; single: a call each.
    assert requests_made(fake_cio) == (1 if transport == "batch" else 4)


@BOTH_TRANSPORTS
async def test_cli_sync_once_full_sends_every_attribute_again(settings_file, tmp_path, fake_cio):
    settings = settings_file()
    await import_good_users(settings, tmp_path)
    first = await run_cli(settings, "sync", "--once")
    assert first.code == 0, first.stderr
    first_bodies = {c.customer_id: c.body for c in operations(fake_cio, "identify")}

    fake_cio.reset()
    result = await run_cli(settings, "sync", "--once", "--full")
    assert result.code == 0, result.stderr
    assert summary_counts(result.stdout)[0] == 3
    again = {c.customer_id: c.body for c in operations(fake_cio, "identify")}
    assert again == first_bodies
    assert set(again["ext-1"]) >= {
        "email",
        "created_at",
        "hull_segments",
        "first_name",
        "plan",
    }
    # Events already sent are not sent again by a full pass.
    assert operations(fake_cio, "event") == []


@BOTH_TRANSPORTS
async def test_cli_sync_once_with_wrong_credentials_fails(settings_file, tmp_path, fake_cio):
    settings = settings_file(api_key="not-the-right-key")
    await import_good_users(settings, tmp_path)
    result = await run_cli(settings, "sync", "--once")
    assert result.code != 0
    assert "Invalid credentials" in result.stderr
    assert fake_cio.customers == {}
    assert all(user.pending for user in (await stored_users(settings)).values())


@BOTH_TRANSPORTS
async def test_cli_sync_once_without_credentials_fails(settings_file, tmp_path, fake_cio):
    settings = settings_file(site_id=None, api_key=None)
    await import_good_users(settings, tmp_path)
    result = await run_cli(settings, "sync", "--once")
    assert result.code != 0
    assert "not set" in result.stderr
    assert fake_cio.requests == []


async def test_cli_ingest_token_prints_the_configured_token(settings_file):
    result = await run_cli(settings_file(), "ingest-token")
    assert result.code == 0, result.stderr
    assert result.stdout.strip() == INGEST_TOKEN


async def test_cli_webhook_url_prints_and_rotates(settings_file):
    config = settings_file()
    first = await run_cli(config, "webhook-url")
    again = await run_cli(config, "webhook-url")
    rotated = await run_cli(config, "webhook-url", "--rotate")
    assert first.code == again.code == rotated.code == 0
    assert first.stdout.startswith("http://127.0.0.1:8080/webhook?conf=")
    assert first.stdout == again.stdout != rotated.stdout


async def test_cli_webhook_url_follows_the_port_without_a_public_url(settings_file):
    config = settings_file()
    config.write_text(config.read_text(encoding="utf-8") + "[server]\nport = 9000\n")
    result = await run_cli(config, "webhook-url")
    assert result.code == 0, result.stderr
    assert result.stdout.startswith("http://127.0.0.1:9000/webhook?conf=")


async def test_cli_retry_failed_makes_quarantined_records_pending(settings_file, db_url):
    config = settings_file()
    assert (await run_cli(config, "migrate")).code == 0
    engine = make_engine(db_url)
    try:
        async with engine.begin() as connection:
            await connection.execute(
                WebhookDelivery.__table__.insert(),
                [
                    {
                        "event_id": f"bad-{i}",
                        "body": "{}",
                        "headers": {},
                        "received_at": utcnow(),
                        "status": "invalid",
                        "error": "event_id is missing",
                    }
                    for i in range(2)
                ],
            )
        result = await run_cli(config, "retry-failed")
        async with engine.connect() as connection:
            statuses = (
                await connection.execute(select(WebhookDelivery.status).order_by("event_id"))
            ).scalars()
            assert list(statuses) == ["pending", "pending"]
    finally:
        await engine.dispose()
    assert result.code == 0, result.stderr
    assert result.stdout == "retrying 0 user(s), 2 webhook(s), 0 forwarded event(s)\n"
