"""Small JSON documents by key: connector settings, generated secrets, check results."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from connector.db.models import KeyValue
from connector.db.types import utcnow
from connector.db.upsert import insert


async def get_value(session: AsyncSession, key: str, default: Any = None) -> Any:
    value = await session.scalar(select(KeyValue.value).where(KeyValue.key == key))
    return default if value is None else value


async def put_value(session: AsyncSession, key: str, value: Any) -> None:
    statement = insert(session, KeyValue).values(key=key, value=value, updated_at=utcnow())
    statement = statement.on_conflict_do_update(
        index_elements=["key"], set_={"value": value, "updated_at": utcnow()}
    )
    await session.execute(statement)


async def put_if_absent(session: AsyncSession, key: str, value: Any) -> Any:
    """Store ``value`` unless the key exists; return whatever is stored afterwards.

    Two instances starting at once agree on one generated secret this way.
    """
    statement = insert(session, KeyValue).values(key=key, value=value, updated_at=utcnow())
    await session.execute(statement.on_conflict_do_nothing(index_elements=["key"]))
    return await get_value(session, key)


async def delete_stale(session: AsyncSession, prefix: str, before: datetime) -> int:
    """Delete the documents under ``prefix`` last written before ``before``; how many went."""
    result = await session.execute(
        delete(KeyValue).where(
            KeyValue.key.startswith(prefix, autoescape=True), KeyValue.updated_at < before
        )
    )
    return result.rowcount


class KeyValueStore:
    """The same operations, each in a transaction of its own."""

    def __init__(self, sessionmaker: async_sessionmaker):
        self._sessionmaker = sessionmaker

    async def get(self, key: str, default: Any = None) -> Any:
        async with self._sessionmaker() as session:
            return await get_value(session, key, default)

    async def put(self, key: str, value: Any) -> None:
        async with self._sessionmaker() as session, session.begin():
            await put_value(session, key, value)

    async def put_if_absent(self, key: str, value: Any) -> Any:
        async with self._sessionmaker() as session, session.begin():
            return await put_if_absent(session, key, value)
