"""The inbox: raw webhook deliveries written with group commits, deduplicated by event id.

Every webhook waits for the commit that holds it before it is acknowledged. Requests that
arrive while a commit is under way are written together in the next one, so under load one
transaction carries many webhooks instead of each paying for its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import sqlite3
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg
import orjson
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, async_sessionmaker

from connector.db.engine import SQLITE_BUSY_TIMEOUT_MS
from connector.db.models import WebhookDelivery
from connector.db.types import utcnow
from connector.rules.failures import is_transient

_TABLE = WebhookDelivery.__table__

# The receiver counts as working for this long after a webhook arrived (processing gives way
# meanwhile, see InboundProcessor.give_way_to).
RECEIVING_SECONDS = 0.05
# Weight of the newest group in the running average of group sizes.
GROUP_SIZE_WEIGHT = 0.2
# Groups committed side by side on PostgreSQL: while one waits for its WAL flush, the next is
# on its way. Each holds one of the engine's pooled connections (10 + 10 overflow) while the
# service runs.
POSTGRESQL_GROUPS_IN_FLIGHT = 4
# How long the SQLite writer keeps the connection while groups keep coming (see _run_sqlite).
HOLD_SECONDS = 0.02
# Turns of the event loop the SQLite writer waits for the next group before it gives the
# connection back: a group written on the loop's thread leaves the queue empty, and the next
# requests' handlers run a turn or two later (see _arriving).
ARRIVAL_TURNS = 2
# One INSERT carries at most this many rows (SQLite's variable limit allows ~32,000 / 5 columns).
MAX_GROUP = 500


@dataclass(eq=False, slots=True)
class _Pending:
    event_id: str
    body: str
    # The kept headers, already JSON (orjson: a tenth of what the column's encoder costs).
    headers: str
    # time.monotonic() when it arrived.
    arrived: float
    done: asyncio.Future[bool] = field(repr=False)


class InboxWriter:
    def __init__(self, sessionmaker: async_sessionmaker):
        self._engine: AsyncEngine | None = sessionmaker.kw.get("bind")
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._task: asyncio.Task | None = None
        self._last_arrival = float("-inf")
        self._group_size = 1.0
        # SQLite has one writer at a time whatever we do; PostgreSQL commits groups side by
        # side (and flushes its WAL for several at once), each on a connection of its own.
        sqlite = self._engine is not None and self._engine.dialect.name == "sqlite"
        self._parallel = 1 if sqlite else POSTGRESQL_GROUPS_IN_FLIGHT
        self._slots = asyncio.Semaphore(self._parallel)
        self._writing = False
        self._in_flight: set[asyncio.Task] = set()
        # PostgreSQL: the writer's connections, each with its asyncpg connection.
        self._connections: list[tuple[AsyncConnection, Any]] = []
        self._bind_received = None
        if sqlite:
            dialect = self._engine.dialect
            column = _TABLE.c.received_at.type.dialect_impl(dialect)
            self._bind_received = column.bind_processor(dialect)

    @property
    def load(self) -> float:
        """How hard the receiver is working: 0 when no webhook arrived in the last
        :data:`RECEIVING_SECONDS`; else the recent average of webhooks a commit (about 1 while
        each commits alone; more when they queue behind commits: the receiver is saturated)."""
        if time.monotonic() - self._last_arrival >= RECEIVING_SECONDS:
            return 0.0
        return max(self._group_size, 1.0)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="inbox-writer")

    async def close(self) -> None:
        """Write what is queued, then stop."""
        if self._task is None:
            return
        while not self._queue.empty() or self._in_flight or self._writing:
            await asyncio.sleep(0.01)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
        while self._connections:
            await self._connections.pop()[0].close()

    async def store(self, event_id: str, body: str, headers: dict[str, str]) -> bool:
        """Commit one delivery; False when that event id was stored before (a duplicate)."""
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._last_arrival = arrived = time.monotonic()
        headers_json = orjson.dumps(headers).decode()
        self._queue.put_nowait(_Pending(event_id, body, headers_json, arrived, done))
        return await done

    async def _run(self) -> None:
        await (self._run_sqlite() if self._parallel == 1 else self._run_postgresql())

    def _next_group(self, first: _Pending, waited_since: float | None = None) -> list[_Pending]:
        """``first`` and what is queued after it, counted in :attr:`load`. With
        ``waited_since`` (when the SQLite writer began to wait for the connection), only the
        webhooks that arrived before count: those that arrived while processing had the
        connection queued behind its transaction, not behind the inbox's commits, and counted,
        each processing batch would make the processor give way as if the receiver were
        saturated."""
        group = [first]
        while not self._queue.empty() and len(group) < MAX_GROUP:
            group.append(self._queue.get_nowait())
        size = len(group)
        if waited_since is not None:
            size = sum(1 for item in group if item.arrived <= waited_since)
        self._group_size += GROUP_SIZE_WEIGHT * (size - self._group_size)
        return group

    async def _run_sqlite(self) -> None:
        """One group at a time, each awaited here: a task of its own would cost a turn of the
        event loop at each end, which under load is most of a group's wait.

        The connection is kept while groups keep coming, for at most :data:`HOLD_SECONDS`:
        checking the process's one connection out and back in costs the event loop about as
        much as writing a group (some 35 µs), and between holds the connection's other users
        (processing, the API) get their turn. While it is kept, groups are written on the
        event loop's own thread (:class:`_SQLiteTarget`)."""
        assert self._engine is not None
        while True:
            first = await self._queue.get()
            self._writing = True
            group, waited_since = [first], time.monotonic()
            try:
                async with self._engine.connect() as connection:
                    driver = (await connection.get_raw_connection()).driver_connection
                    group = self._next_group(first, waited_since)
                    with _SQLiteTarget(driver) as target:
                        until = time.monotonic() + HOLD_SECONDS
                        # A webhook's received_at is when the commit holding it starts: before
                        # its 200, and at most a commit's time after it arrived.
                        while await self._commit(group, utcnow(), target):
                            if not await self._arriving(until):
                                break
                            group = self._next_group(self._queue.get_nowait())
            except Exception as exc:
                # No connection to be had (or it failed on its way back): those still waiting
                # fail with the reason.
                _fail(group, exc)
            finally:
                self._writing = False

    async def _arriving(self, until: float) -> bool:
        """Whether webhooks are queued, or are within :data:`ARRIVAL_TURNS` turns of the event
        loop, before ``until``. A group written on the loop's thread leaves nothing queued:
        requests read meanwhile reach the inbox when their handlers run, a turn or two later."""
        for _ in range(ARRIVAL_TURNS):
            if not self._queue.empty():
                return True
            if time.monotonic() >= until:
                return False
            await asyncio.sleep(0)
        return not self._queue.empty()

    async def _run_postgresql(self) -> None:
        while True:
            # A free slot first: what arrives while every slot is busy joins the next group.
            await self._slots.acquire()
            group = self._next_group(await self._queue.get())
            task = asyncio.create_task(self._commit_in_slot(group, utcnow()), name="inbox-commit")
            self._in_flight.add(task)
            task.add_done_callback(self._in_flight.discard)

    async def _commit_in_slot(self, group: list[_Pending], received_at: datetime) -> None:
        try:
            await self._commit(group, received_at)
        finally:
            self._slots.release()

    async def _commit(
        self, group: list[_Pending], received_at: datetime, target: _SQLiteTarget | None = None
    ) -> bool:
        """Write ``group`` (on SQLite through ``target``) and settle each
        webhook's future; whether it was written whole. When the group fails as a whole, its
        webhooks are written one by one, so only one the database refuses fails (and its
        neighbours in the group are still acknowledged)."""
        try:
            inserted = await self._write(group, received_at, target)
        except Exception as exc:
            if len(group) == 1 or is_unavailable(exc):
                _fail(group, exc)
                return False
            for item in group:
                await self._commit([item], received_at, target)
            return False
        for item in group:
            if not item.done.done():
                item.done.set_result(item in inserted)
        return True

    async def _write(
        self, group: list[_Pending], received_at: datetime, target: _SQLiteTarget | None
    ) -> set[_Pending]:
        """Insert the group; returns the items that were new (the first of each event id)."""
        first: dict[str, _Pending] = {}
        for item in group:
            first.setdefault(item.event_id, item)
        if target is not None:
            stored = await self._write_sqlite(list(first.values()), received_at, target)
        else:
            stored = await self._write_postgresql(list(first.values()), received_at)
        return {first[event_id] for event_id in stored}

    async def _write_postgresql(self, items: list[_Pending], received_at: datetime) -> set[str]:
        """The group as one ``INSERT … SELECT FROM unnest(…) ON CONFLICT DO NOTHING RETURNING``
        in autocommit mode, on a connection the writer keeps: one statement is a transaction of
        its own, so this is one round trip to PostgreSQL a group, where a session cost four (the
        pool's ping, BEGIN, the INSERT, COMMIT), each waiting for a turn of the event loop,
        which is busy receiving. The statement goes to asyncpg itself (its statement cache
        prepares it once): through SQLAlchemy's execution and result layers it cost the event
        loop 84 µs a group, directly 32. Up to :data:`POSTGRESQL_GROUPS_IN_FLIGHT` groups are
        written at once, each on one of the writer's connections.

        A kept connection may have ended while it was idle (PostgreSQL restarted, an operator
        ended the backend): then the group is written once more on a new connection rather
        than answered with a 500, after which Customer.io would hold back every webhook for an
        hour. Sending it twice is safe: if the first did commit, the second finds its event
        ids stored and the webhooks are acknowledged as duplicates (stored once all the same)."""
        kept = bool(self._connections)
        connection, driver = self._connections.pop() if kept else await self._connect()
        try:
            return await self._insert(connection, driver, items, received_at)
        except Exception as exc:
            if not kept or _refused_by_server(exc):
                raise
        return await self._insert(*await self._connect(), items, received_at)

    async def _insert(
        self, connection: AsyncConnection, driver: Any, items: list[_Pending], received_at: datetime
    ) -> set[str]:
        """The statement on ``connection``, which goes back to the writer unless it failed."""
        try:
            rows = await driver.fetch(
                _POSTGRESQL_INSERT,
                [item.event_id for item in items],
                [item.body for item in items],
                [item.headers for item in items],
                received_at,
            )
        except Exception as exc:
            if _refused_by_server(exc) and not driver.is_closed():
                # PostgreSQL refused the statement: the connection itself is fine.
                self._connections.append((connection, driver))
            else:
                # Anything else (the connection ended, or asyncpg found it busy with a message
                # the server sent unasked, as after pg_terminate_backend): not used again.
                with contextlib.suppress(Exception):
                    await connection.invalidate()
                    await connection.close()
            raise
        self._connections.append((connection, driver))
        return {row[0] for row in rows}

    async def _connect(self) -> tuple[AsyncConnection, Any]:
        """A new connection for the writer, in autocommit mode, with its asyncpg connection."""
        assert self._engine is not None
        connection = await self._engine.connect()
        await connection.execution_options(isolation_level="AUTOCOMMIT")
        return connection, (await connection.get_raw_connection()).driver_connection

    async def _write_sqlite(
        self, items: list[_Pending], received_at: datetime, target: _SQLiteTarget
    ) -> set[str]:
        """The same INSERT as one statement in autocommit mode, through ``target``.

        A single statement is a transaction of its own in SQLite (taking the write lock when it
        starts), so this commits exactly like :meth:`_write_postgresql` does. The time goes
        through the column's own bind processor, so it is stored exactly as SQLAlchemy stores
        it (the headers are JSON text already).
        """
        bind = self._bind_received
        received = bind(received_at) if bind else received_at
        # _run never hands over more than MAX_GROUP: 5 values each, far below SQLite's limit
        # of 32,766 variables, so the group is one statement, hence one transaction.
        parameters: list[Any] = []
        for item in items:
            parameters += (item.event_id, item.body, item.headers, received, "pending")
        rows = await target.execute(_sqlite_insert_sql(len(items)), parameters)
        return {row[0] for row in rows}


class _SQLiteTarget:
    """Where the inbox's statements run on SQLite while the writer keeps the connection: on
    the event loop's own thread when SQLite's write lock is free, else on aiosqlite's thread,
    which waits for it.

    A group's INSERT takes SQLite some 5-13 µs a webhook. Sent to aiosqlite's thread it cost
    more than that in hops (a queue, the thread's wait for the GIL, a wake-up of the event
    loop, a turn of it), and every request of the group waited for them while the loop, with
    nothing else to do, idled: under load the receiver moved in step with its commits. On the
    loop's thread the group is written and its requests answered in the next turn. The
    busy timeout is 0 meanwhile, so the loop never waits for the lock: when another process
    (``serve --workers``, a CLI command) holds it, the statement is handed to aiosqlite's
    thread with the usual timeout. The process's other transactions cannot hold it: they
    would need this connection, the process's only one.
    """

    def __init__(self, driver: Any):
        self._driver = driver
        self._connection = _loop_connection(driver)

    def __enter__(self) -> _SQLiteTarget:
        self._busy_timeout(0)
        return self

    def __exit__(self, *_exc: object) -> None:
        self._busy_timeout(SQLITE_BUSY_TIMEOUT_MS)

    def _busy_timeout(self, milliseconds: int) -> None:
        if self._connection is not None:
            self._connection.execute(f"PRAGMA busy_timeout = {milliseconds}")

    async def execute(self, sql: str, parameters: list[Any]) -> list[Any]:
        """The statement's rows, committed (autocommit: one statement, one transaction)."""
        if self._connection is not None:
            try:
                return self._connection.execute(sql, parameters).fetchall()
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc):
                    raise
            # Another process is writing: nothing was written (a statement that cannot take
            # the write lock does nothing); wait for the lock off the loop's thread.
            self._busy_timeout(SQLITE_BUSY_TIMEOUT_MS)
            try:
                return list(await self._driver.execute_fetchall(sql, parameters))
            finally:
                self._busy_timeout(0)
        rows = await self._driver.execute_fetchall(sql, parameters)
        if self._driver.in_transaction:
            # Not in autocommit mode after all: the statement opened a transaction.
            await self._driver.commit()
        return list(rows)


def _loop_connection(driver: Any) -> sqlite3.Connection | None:
    """aiosqlite's ``sqlite3`` connection, usable from the event loop's thread (the engine
    opens it with ``check_same_thread=False``) and in autocommit mode; None otherwise, and the
    inbox then writes on aiosqlite's thread."""
    try:
        connection = driver._conn  # aiosqlite keeps it private; tests/db pin that it is there
    except (AttributeError, ValueError):
        return None
    if not isinstance(connection, sqlite3.Connection) or connection.isolation_level is not None:
        return None
    return connection


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    """Whether SQLite refused the statement because another connection holds the lock."""
    return exc.sqlite_errorcode & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


_POSTGRESQL_INSERT = (
    f"INSERT INTO {_TABLE.name} (event_id, body, headers, received_at, status) "
    "SELECT event_id, body, headers, $4, 'pending' "
    "FROM unnest($1::text[], $2::text[], $3::jsonb[]) AS given (event_id, body, headers) "
    "ON CONFLICT (event_id) DO NOTHING RETURNING event_id"
)
# What the drivers raise when the database is unavailable (the inbox writes without SQLAlchemy,
# through which these would arrive as the OperationalError and InterfaceError that is_transient
# knows): sqlite3's for a lock held too long or an I/O error, asyncpg's for the connection or
# the server.
_UNAVAILABLE = (
    sqlite3.OperationalError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
    # The connection's protocol is still busy with a message the server sent unasked (the
    # FATAL that ends a terminated backend), so it cannot take a statement.
    asyncpg.exceptions.InternalClientError,
)


def is_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` says the database is unavailable for now, not that it refused a row."""
    return is_transient(exc) or isinstance(exc, _UNAVAILABLE)


def _refused_by_server(exc: BaseException) -> bool:
    """Whether PostgreSQL answered ``exc`` to the statement (a constraint, a type), with the
    connection still good for the next."""
    return isinstance(exc, asyncpg.PostgresError) and not is_unavailable(exc)


def _fail(group: list[_Pending], exc: BaseException) -> None:
    for item in group:
        if not item.done.done():
            item.done.set_exception(exc)


@functools.lru_cache(maxsize=64)
def _sqlite_insert_sql(count: int) -> str:
    values = ", ".join(["(?, ?, ?, ?, ?)"] * count)
    return (
        f"INSERT INTO {_TABLE.name} (event_id, body, headers, received_at, status) "
        f"VALUES {values} ON CONFLICT (event_id) DO NOTHING RETURNING event_id"
    )
