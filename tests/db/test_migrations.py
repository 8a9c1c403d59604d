"""Migrations build exactly the tables of the models; serve refuses an unmigrated shared
database."""

from __future__ import annotations

import asyncio
import os
import sys
import uuid

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy.engine import make_url

from connector.config import parse_config
from connector.db.engine import make_engine
from connector.db.models import Base
from connector.runtime import DatabaseNotMigrated, prepare_database

from ..conftest import ADMIN_PASSWORD, POSTGRES_ENV
from ..support import admin_execute

EXPRESSION_INDEXES = {"ix_users_email_lower"}


def _comparable(obj, name, type_, reflected, compare_to) -> bool:
    # SQLite cannot reflect indexes on expressions such as lower(email); PostgreSQL checks them.
    return not (type_ == "index" and name in EXPRESSION_INDEXES)


@pytest.mark.filterwarnings("ignore:Skipped unsupported reflection of expression-based index")
@pytest.mark.filterwarnings(
    "ignore:autogenerate skipping metadata-specified expression-based index"
)
async def test_migrations_match_the_models(db_url):
    engine = make_engine(db_url)
    options = {"include_object": _comparable} if db_url.startswith("sqlite") else {}
    try:
        async with engine.connect() as connection:
            differences = await connection.run_sync(
                lambda sync: compare_metadata(
                    MigrationContext.configure(sync, opts=options), Base.metadata
                )
            )
    finally:
        await engine.dispose()
    assert differences == []


@pytest.fixture
async def empty_postgres_url():
    server_url = os.environ.get(POSTGRES_ENV)
    if not server_url:
        pytest.skip(f"needs {POSTGRES_ENV}")
    name = f"connector_empty_{uuid.uuid4().hex[:10]}"
    await admin_execute(server_url, f'CREATE DATABASE "{name}"')
    try:
        yield make_url(server_url).set(database=name).render_as_string(hide_password=False)
    finally:
        await admin_execute(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.mark.postgres
async def test_migrations_serve_refuses_an_unmigrated_postgres_database(
    empty_postgres_url, tmp_path
):
    config = parse_config(
        {"database": {"url": empty_postgres_url}, "security": {"admin_password": ADMIN_PASSWORD}}
    )
    with pytest.raises(DatabaseNotMigrated, match="connector migrate"):
        await prepare_database(config)

    settings = tmp_path / "settings.toml"
    settings.write_text(
        f'[database]\nurl = "{empty_postgres_url}"\n'
        f'[security]\nadmin_password = "{ADMIN_PASSWORD}"\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONNECTOR_")}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "connector",
        "--config",
        str(settings),
        "serve",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    _, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == 1
    assert b"connector migrate" in stderr
