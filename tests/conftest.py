"""Shared fixtures: databases (SQLite and PostgreSQL), configurations, the running app.

Every test that asks for ``db_url`` runs twice: on a fresh SQLite file and on a PostgreSQL
database this session creates on ``CONNECTOR_TEST_POSTGRES_URL``'s server (and drops at the
end). Without that variable the PostgreSQL runs are skipped, unless
``CONNECTOR_TEST_REQUIRE_POSTGRES=1`` (set by .ci/run), which turns the skip into a failure.
"""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest
from aiohttp.test_utils import TestServer
from sqlalchemy import text

from connector.config import Config, parse_config
from connector.db import migrate
from connector.db.engine import make_engine
from connector.db.models import Base
from connector.web.app import create_app
from connector.web.serving import ServiceRunner

from .support import run_blocking, scratch_postgres_database

if TYPE_CHECKING:
    from .fake_customerio import FakeCustomerIO

pytest_plugins = ["tests.fake_customerio", "tests.fake_segment"]

POSTGRES_ENV = "CONNECTOR_TEST_POSTGRES_URL"
REQUIRE_POSTGRES_ENV = "CONNECTOR_TEST_REQUIRE_POSTGRES"
ADMIN_PASSWORD = "test-admin-password"
INGEST_TOKEN = "test-ingest-token-0123456789"


def _postgres_required() -> bool:
    return os.environ.get(REQUIRE_POSTGRES_ENV, "") not in ("", "0", "false")


@pytest.fixture(scope="session")
def postgres_database() -> Iterator[str]:
    """A database of this test session's own on the PostgreSQL server, migrated once."""
    server_url = os.environ.get(POSTGRES_ENV)
    if not server_url:
        message = f"PostgreSQL tests need {POSTGRES_ENV}"
        if _postgres_required():
            pytest.fail(message)
        pytest.skip(message)
    with contextlib.ExitStack() as stack:
        try:
            url = stack.enter_context(scratch_postgres_database(server_url, "connector_test"))
        except Exception as exc:
            pytest.fail(f"cannot create a PostgreSQL test database on {POSTGRES_ENV}: {exc}")
        yield url


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A migrated SQLite file that each test copies, so migrations run once per session."""
    path = tmp_path_factory.mktemp("template") / "template.db"
    run_blocking(migrate.upgrade(f"sqlite+aiosqlite:///{path}"))
    return str(path)


async def _truncate(url: str) -> None:
    engine = make_engine(url)
    try:
        async with engine.begin() as connection:
            tables = ", ".join(f'"{table.name}"' for table in Base.metadata.sorted_tables)
            await connection.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
    finally:
        await engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def db_url(request: pytest.FixtureRequest, tmp_path) -> AsyncIterator[str]:
    """The URL of an empty, migrated database: SQLite, then PostgreSQL."""
    if request.param == "sqlite":
        path = tmp_path / "connector.db"
        shutil.copyfile(request.getfixturevalue("sqlite_template"), path)
        yield f"sqlite+aiosqlite:///{path}"
        return
    url = request.getfixturevalue("postgres_database")
    await _truncate(url)
    yield url


@pytest.fixture
def transport() -> str:
    """``sync.transport`` of the tests' configuration; the outbound tests run on both."""
    return "batch"


@pytest.fixture
def make_config(db_url: str, fake_cio: FakeCustomerIO, transport: str) -> Callable[..., Config]:
    """Build a configuration on the test database, pointed at the fake Customer.io.

    Keyword arguments are ``section={key: value}`` overrides, e.g. ``sync={"max_attempts": 2}``.
    """

    def build(**overrides: dict[str, Any]) -> Config:
        raw: dict[str, Any] = {
            "database": {"url": db_url},
            "security": {"admin_password": ADMIN_PASSWORD, "ingest_token": INGEST_TOKEN},
            "customerio": {"track_host": fake_cio.host, "ca_file": fake_cio.ca_file},
            "sync": {
                # Tests start passes themselves (POST /api/sync?wait=1), one at a time.
                "scheduled": False,
                "backoff_base_seconds": 0.01,
                "backoff_max_seconds": 0.05,
                "rate_limit_per_second": 1000,
                "transport": transport,
            },
            "connector": {
                "site_id": fake_cio.site_id,
                "api_key": fake_cio.api_key,
                "synchronized_segments": ["seg-paying"],
            },
        }
        for section, values in overrides.items():
            raw.setdefault(section, {}).update(values)
        return parse_config(raw)

    return build


def basic_auth(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


ADMIN = basic_auth("admin", ADMIN_PASSWORD)
INGEST = {"Authorization": f"Bearer {INGEST_TOKEN}"}


class ServiceTestServer(TestServer):
    """A test server made as ``connector serve`` makes its server: with the webhook lane."""

    async def _make_runner(self, **kwargs: Any) -> ServiceRunner:
        return ServiceRunner(self.app, **kwargs)


@pytest.fixture
def start_app(aiohttp_client, make_config) -> Callable[..., Any]:
    """Start the service (through its HTTP interface) with a configuration of the test's."""

    async def start(config: Config | None = None, **overrides: dict[str, Any]):
        return await aiohttp_client(
            ServiceTestServer(create_app(config or make_config(**overrides)))
        )

    return start
