"""The SQLite engine's pool: a connection comes back without a transaction left open, and one
that had none open costs no rollback (the webhook inbox returns its connection a group)."""

from __future__ import annotations

import pytest

from connector.db.engine import make_engine
from connector.inbound.inbox import _loop_connection


@pytest.fixture
async def engine(tmp_path):
    engine = make_engine(f"sqlite+aiosqlite:///{tmp_path / 'pool.db'}")
    yield engine
    await engine.dispose()


async def raw(connection):
    return (await connection.get_raw_connection()).driver_connection


async def test_sqlite_pool_rolls_back_what_raw_driver_use_left_open(engine):
    async with engine.connect() as connection:
        driver = await raw(connection)
        await driver.execute("CREATE TABLE t (x INTEGER)")
        await driver.execute("BEGIN IMMEDIATE")
        await driver.execute("INSERT INTO t VALUES (1)")
        assert driver.in_transaction
    async with engine.connect() as connection:
        driver = await raw(connection)
        assert not driver.in_transaction
        assert await driver.execute_fetchall("SELECT count(*) FROM t") == [(0,)]


async def test_sqlite_pool_leaves_autocommit_writes_and_sessions_alone(engine):
    async with engine.connect() as connection:
        driver = await raw(connection)
        await driver.execute("CREATE TABLE t (x INTEGER)")
        await driver.execute("INSERT INTO t VALUES (1)")
        assert not driver.in_transaction
    async with engine.begin() as connection:
        await connection.exec_driver_sql("INSERT INTO t VALUES (2)")
    async with engine.connect() as connection:
        rows = await (await raw(connection)).execute_fetchall("SELECT x FROM t ORDER BY x")
    assert rows == [(1,), (2,)]


async def test_sqlite_connection_takes_statements_on_the_event_loops_thread(engine):
    # The webhook inbox writes through aiosqlite's sqlite3 connection on the loop's thread
    # (inbound/inbox.py): it must be there, open for this thread, in autocommit mode.
    async with engine.connect() as connection:
        driver = await raw(connection)
        on_loop = _loop_connection(driver)
        assert on_loop is not None
        on_loop.execute("CREATE TABLE t (x INTEGER)")
        on_loop.execute("INSERT INTO t VALUES (1)")
        assert not on_loop.in_transaction
        assert await driver.execute_fetchall("SELECT x FROM t") == [(1,)]
