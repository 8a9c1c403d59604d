"""The inbox: raw webhook deliveries written with group commits, deduplicated by event id.

Every webhook waits for the commit that holds it before it is acknowledged. Requests that
arrive while a commit is under way are written together in the next one, so under load one
transaction carries many webhooks instead of each paying for its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker

from connector.db.models import WebhookDelivery
from connector.db.types import utcnow
from connector.db.upsert import insert
from connector.rules.failures import is_transient

_TABLE = WebhookDelivery.__table__

# The receiver counts as busy for this long after a webhook arrived: at 1,000 webhooks/s and
# more, it is busy all the time, and processing gives way (see InboundProcessor.give_way_to).
RECEIVING_SECONDS = 0.05
# One INSERT carries at most this many rows (SQLite's variable limit allows ~32,000 / 5 columns).
MAX_GROUP = 500


@dataclass(eq=False)
class _Pending:
    event_id: str
    body: str
    headers: dict[str, str]
    received_at: datetime
    done: asyncio.Future[bool] = field(repr=False)


class InboxWriter:
    def __init__(self, sessionmaker: async_sessionmaker):
        self._sessionmaker = sessionmaker
        self._engine: AsyncEngine | None = sessionmaker.kw.get("bind")
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._task: asyncio.Task | None = None
        self._writing = False
        self._last_arrival = float("-inf")

    @property
    def busy(self) -> bool:
        """Whether webhooks are waiting for (or being written by) a commit, or one arrived in
        the last :data:`RECEIVING_SECONDS`."""
        return (
            self._writing
            or not self._queue.empty()
            or time.monotonic() - self._last_arrival < RECEIVING_SECONDS
        )

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="inbox-writer")

    async def close(self) -> None:
        """Write what is queued, then stop."""
        if self._task is None:
            return
        while not self._queue.empty():
            await asyncio.sleep(0.01)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None

    async def store(self, event_id: str, body: str, headers: dict[str, str]) -> bool:
        """Commit one delivery; False when that event id was stored before (a duplicate)."""
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._last_arrival = time.monotonic()
        self._queue.put_nowait(_Pending(event_id, body, headers, utcnow(), done))
        return await done

    async def _run(self) -> None:
        while True:
            group = [await self._queue.get()]
            while not self._queue.empty() and len(group) < MAX_GROUP:
                group.append(self._queue.get_nowait())
            self._writing = True
            try:
                await self._commit(group)
            finally:
                self._writing = False

    async def _commit(self, group: list[_Pending]) -> None:
        """Write ``group`` and settle each webhook's future. When the group fails as a whole,
        its webhooks are written one by one, so only one the database refuses fails (and
        its neighbours in the group are still acknowledged)."""
        try:
            inserted = await self._write(group)
        except Exception as exc:
            if len(group) == 1 or is_transient(exc):
                for item in group:
                    if not item.done.done():
                        item.done.set_exception(exc)
                return
            for item in group:
                await self._commit([item])
            return
        for item in group:
            if not item.done.done():
                item.done.set_result(item in inserted)

    async def _write(self, group: list[_Pending]) -> set[_Pending]:
        """Insert the group; returns the items that were new (the first of each event id)."""
        first: dict[str, _Pending] = {}
        for item in group:
            first.setdefault(item.event_id, item)
        if self._engine is not None and self._engine.dialect.name == "sqlite":
            stored = await self._write_sqlite(list(first.values()))
        else:
            stored = await self._write_orm(list(first.values()))
        return {first[event_id] for event_id in stored}

    async def _write_orm(self, items: list[_Pending]) -> set[str]:
        rows = [
            {
                "event_id": item.event_id,
                "body": item.body,
                "headers": item.headers,
                "received_at": item.received_at,
                "status": "pending",
            }
            for item in items
        ]
        async with self._sessionmaker() as session, session.begin():
            # The rows go as parameters of one cached statement (SQLAlchemy's "insertmanyvalues"
            # batches them), not into a VALUES list compiled afresh for every group size; and
            # through the Core table, so the ORM's bulk-insert machinery is skipped.
            result = await session.execute(
                insert(session, _TABLE)
                .on_conflict_do_nothing(index_elements=["event_id"])
                .returning(_TABLE.c.event_id),
                rows,
            )
            return {row[0] for row in result}

    async def _write_sqlite(self, items: list[_Pending]) -> set[str]:
        """The same INSERT as one statement on the driver's connection, in autocommit mode.

        A single statement is a transaction of its own in SQLite (taking the write lock when it
        starts, waiting for it with the busy timeout), so this commits exactly like
        :meth:`_write_orm` does. But it costs one round trip to aiosqlite's thread instead of
        about nine (BEGIN, cursor, execute, fetch, close, COMMIT, ...), each of which waits for
        the event loop, which is busy receiving webhooks: at low rates that was most of the
        cost of a webhook, and under load most of its latency. Values go through the columns'
        own bind processors, so they are stored exactly as SQLAlchemy stores them.
        """
        assert self._engine is not None
        dialect = self._engine.dialect
        headers = _TABLE.c.headers.type.dialect_impl(dialect).bind_processor(dialect)
        received_at = _TABLE.c.received_at.type.dialect_impl(dialect).bind_processor(dialect)
        # _run never hands over more than MAX_GROUP: 5 values each, far below SQLite's limit
        # of 32,766 variables, so the group is one statement, hence one transaction.
        parameters: list[Any] = []
        for item in items:
            parameters += (
                item.event_id,
                item.body,
                headers(item.headers) if headers else item.headers,
                received_at(item.received_at) if received_at else item.received_at,
                "pending",
            )
        async with self._engine.connect() as connection:
            driver = (await connection.get_raw_connection()).driver_connection
            rows = await driver.execute_fetchall(_sqlite_insert_sql(len(items)), parameters)
            if driver.in_transaction:
                # Not in autocommit mode after all: the statement opened a transaction.
                await driver.commit()
        return {row[0] for row in rows}


@functools.lru_cache(maxsize=64)
def _sqlite_insert_sql(count: int) -> str:
    values = ", ".join(["(?, ?, ?, ?, ?)"] * count)
    return (
        f"INSERT INTO {_TABLE.name} (event_id, body, headers, received_at, status) "
        f"VALUES {values} ON CONFLICT (event_id) DO NOTHING RETURNING event_id"
    )
