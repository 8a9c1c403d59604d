"""The inbox: raw webhook deliveries written with group commits, deduplicated by event id.

Every webhook waits for the commit that holds it before it is acknowledged. Requests that
arrive while a commit is under way are written together in the next one, so under load one
transaction carries many webhooks instead of each paying for its own.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import async_sessionmaker

from connector.db.models import WebhookDelivery
from connector.db.types import utcnow

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
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._task: asyncio.Task | None = None

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

    async def store(self, event_id: str, body: str, headers: dict[str, str]) -> bool:
        """Commit one delivery; False when that event id was stored before (a duplicate)."""
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Pending(event_id, body, headers, utcnow(), done))
        return await done

    async def _run(self) -> None:
        while True:
            group = [await self._queue.get()]
            while not self._queue.empty() and len(group) < MAX_GROUP:
                group.append(self._queue.get_nowait())
            try:
                inserted = await self._write(group)
            except Exception as exc:
                for item in group:
                    if not item.done.done():
                        item.done.set_exception(exc)
                continue
            for item in group:
                if not item.done.done():
                    item.done.set_result(item in inserted)

    async def _write(self, group: list[_Pending]) -> list[_Pending]:
        """Insert the group; returns the items that were new (the first of each event id)."""
        first: dict[str, _Pending] = {}
        for item in group:
            first.setdefault(item.event_id, item)
        rows = [
            {
                "event_id": item.event_id,
                "body": item.body,
                "headers": item.headers,
                "received_at": item.received_at,
                "status": "pending",
            }
            for item in first.values()
        ]
        table = WebhookDelivery.__table__
        async with self._sessionmaker() as session, session.begin():
            insert = pg_insert if session.bind.dialect.name == "postgresql" else sqlite_insert
            # The rows go as parameters of one cached statement (SQLAlchemy's "insertmanyvalues"
            # batches them), not into a VALUES list compiled afresh for every group size; and
            # through the Core table, so the ORM's bulk-insert machinery is skipped.
            result = await session.execute(
                insert(table)
                .on_conflict_do_nothing(index_elements=["event_id"])
                .returning(table.c.event_id),
                rows,
            )
            stored = {row[0] for row in result}
        return [first[event_id] for event_id in stored]
