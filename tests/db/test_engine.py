"""The SQLite engine: a connection comes back without a transaction left open, one that had
none open costs no rollback (the webhook inbox returns its connection a group), and commits
leave WAL checkpoints to a thread of their own."""

from __future__ import annotations

import asyncio
import sqlite3
from contextlib import closing

import pytest

from connector.db import checkpoints
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


async def test_sqlite_commits_leave_checkpoints_to_a_thread_that_stops_with_the_engine(tmp_path):
    path = tmp_path / "wal.db"
    engine = make_engine(f"sqlite+aiosqlite:///{path}")
    async with engine.connect() as connection:
        driver = await raw(connection)
        assert await driver.execute_fetchall("PRAGMA wal_autocheckpoint") == [(0,)]
        record = connection.sync_connection.connection._connection_record
        checkpointer = record.info["checkpointer"]
        assert checkpointer.running
        await driver.execute("CREATE TABLE t (x TEXT)")
        # Far more than SQLite's own threshold of 1,000 pages.
        await driver.executemany("INSERT INTO t VALUES (?)", [("x" * 4000,)] * 3000)
    # The thread copies the log into the database file: it grows while the log is kept.
    for _ in range(100):
        if path.stat().st_size > 3000 * 4000:
            break
        await asyncio.sleep(0.05)
    assert path.stat().st_size > 3000 * 4000
    assert (tmp_path / "wal.db-wal").exists()
    await engine.dispose()
    assert not checkpointer.running


def test_checkpoint_starts_a_long_log_over(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoints, "RESTART_PAGES", 50)
    path = tmp_path / "log.db"
    with closing(sqlite3.connect(path, isolation_level=None)) as writer:
        writer.execute("PRAGMA journal_mode=WAL")
        writer.execute("PRAGMA wal_autocheckpoint=0")
        writer.execute("CREATE TABLE t (x TEXT)")
        writer.executemany("INSERT INTO t VALUES (?)", [("x" * 4000,)] * 100)
        with closing(sqlite3.connect(path, isolation_level=None)) as other:
            checkpoints.checkpoint(other)

            # Copied whole and started over: the next commit writes from the log's beginning.
            writer.execute("INSERT INTO t VALUES ('after')")
            _busy, pages, copied = other.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    assert pages < 10
    assert copied == pages
