"""Engines and sessions for SQLite (embedded default) and PostgreSQL (scale-out)."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine

from connector.db.checkpoints import WalCheckpointer

# A writer waits this long for another process (e.g. `connector sync --once` beside `serve`)
# to finish its transaction before SQLite gives up with "database is locked".
SQLITE_BUSY_TIMEOUT_MS = 30_000


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


# One encoder for every value (json.dumps with an option builds a new one each call).
_encode = json.JSONEncoder(allow_nan=False).encode


def _json_serializer(value: Any) -> str:
    # NaN and Infinity are not JSON: PostgreSQL refuses them and SQLite's JSON functions then
    # fail on the row. Refusing them here fails one statement instead of corrupting a row.
    return _encode(value)


def make_engine(url: str, **kwargs: Any) -> AsyncEngine:
    """Create an async engine; SQLite gets WAL, a busy timeout and write-locking transactions."""
    kwargs.setdefault("json_serializer", _json_serializer)
    if not is_sqlite(url):
        kwargs.setdefault("pool_size", 10)
        kwargs.setdefault("max_overflow", 10)
        kwargs.setdefault("pool_pre_ping", True)
        # Plan every statement with its values: a prepared statement's generic plan, made
        # while a table was small, kept scanning it whole once it had grown (storing a
        # notification's users took 30-100 ms a chunk at 50,000 users instead of 2).
        kwargs.setdefault(
            "connect_args", {"server_settings": {"plan_cache_mode": "force_custom_plan"}}
        )
        return create_async_engine(url, **kwargs)

    # One connection per process: transactions of this process queue for it in order, instead
    # of contending for SQLite's write lock and sleeping in its busy handler (which starves
    # the webhook inbox behind a long processing transaction). Other processes, such as
    # `connector sync --once` beside `serve`, still wait for the lock with the busy timeout.
    kwargs.setdefault("pool_size", 1)
    kwargs.setdefault("max_overflow", 0)
    # aiosqlite runs the connection on a thread of its own; the webhook inbox also writes on
    # the event loop's thread while it has the connection checked out (inbound/inbox.py).
    kwargs.setdefault("connect_args", {"check_same_thread": False})
    # The pool's own reset rolls back every connection it gets back; _on_reset does it only
    # when a transaction is open.
    kwargs.setdefault("pool_reset_on_return", None)
    engine = create_async_engine(url, **kwargs)

    @event.listens_for(engine.sync_engine, "reset")
    def _on_reset(dbapi_connection: Any, record: Any, state: Any) -> None:
        # A rollback of nothing is still a round trip to aiosqlite's thread, and the webhook
        # inbox, which writes in autocommit mode, returned its connection once a group: a turn
        # of the busy event loop for each. Sessions end their transactions themselves
        # (transaction_was_reset), so this rolls back only what raw driver use left open.
        reset = state.asyncio_safe and not state.transaction_was_reset
        if reset and record.driver_connection.in_transaction:
            dbapi_connection.rollback()

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, record: Any) -> None:
        # Let SQLAlchemy, not the sqlite3 module, decide when transactions begin.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        wal = cursor.fetchone()[0] == "wal"  # not for an in-memory database
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        if wal:
            # Commits never checkpoint: a thread beside the connection does (db/checkpoints).
            cursor.execute("PRAGMA wal_autocheckpoint=0")
            checkpointer = record.info["checkpointer"] = WalCheckpointer(engine.url.database)
            checkpointer.start()
        cursor.close()

    @event.listens_for(engine.sync_engine, "close")
    def _on_close(_dbapi_connection: Any, record: Any) -> None:
        checkpointer = record.info.pop("checkpointer", None)
        if checkpointer is not None:
            checkpointer.stop()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(connection: Any) -> None:
        # IMMEDIATE takes the write lock up front: a deferred transaction that later writes
        # fails at once with SQLITE_BUSY instead of waiting for the busy timeout.
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def make_sessionmaker(engine: AsyncEngine) -> async_sessionmaker:
    return async_sessionmaker(engine, expire_on_commit=False)
