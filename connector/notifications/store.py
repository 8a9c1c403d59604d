"""Writes parsed platform messages to the database and marks changed users pending."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from connector.db import sync_state
from connector.db.models import User, UserEvent
from connector.db.types import utcnow
from connector.db.upsert import insert
from connector.notifications.catalog import record_catalog
from connector.notifications.parse import UserMessage
from connector.rules.failures import failure_reason, is_transient
from connector.settings.store import load_settings
from connector.users.identity import WebhookUserMerge, find_users, new_user_id, platform_user

log = logging.getLogger("connector.notifications")

# Two instances creating the same new user at once: the loser's transaction is replayed.
_MAX_TRANSACTION_TRIES = 3
# Messages per transaction. On SQLite the process has one connection, and webhooks wait for it
# to be acknowledged (Customer.io gives them 4 seconds): 100 users take a few tens of ms.
MAX_MESSAGES_PER_TRANSACTION = 100


@dataclass
class StoreResult:
    accepted: int = 0
    changed: int = 0
    """Users marked pending by this call."""
    new_events: int = 0
    rejected: list[dict[str, Any]] = field(default_factory=list)
    """``{"index", "error"}`` of the messages the database refused."""

    def add(self, other: StoreResult) -> None:
        self.accepted += other.accepted
        self.changed += other.changed
        self.new_events += other.new_events
        self.rejected += other.rejected


def _apply(user: User, message: UserMessage, data_hash: str) -> None:
    user.external_id = message.external_id
    user.email = message.email
    user.anonymous_ids = message.anonymous_ids
    user.attributes = message.attributes
    user.account = message.account
    user.segments = message.segments
    user.indexed_at = message.indexed_at
    user.data_hash = data_hash


async def _insert_events(session: AsyncSession, user_id: str, message: UserMessage) -> int:
    if not message.events:
        return 0
    now = utcnow()
    rows = [
        {
            "user_id": user_id,
            "event_id": event.event_id,
            "name": event.name,
            "properties": event.properties,
            "context": event.context,
            "occurred_at": event.occurred_at,
            "status": "pending",
            "received_at": now,
        }
        for event in message.events
    ]
    statement = (
        insert(session, UserEvent)
        .values(rows)
        .on_conflict_do_nothing(index_elements=["user_id", "event_id"])
        .returning(UserEvent.id)
    )
    return len((await session.execute(statement)).all())


async def _webhook_users_to_merge(
    session: AsyncSession, messages: list[UserMessage], existing: dict[int, User]
) -> WebhookUserMerge:
    """The users created from webhooks that the chunk's users new by ``user.id`` take over."""
    merge = WebhookUserMerge()
    new = [m for position, m in enumerate(messages) if m.key and position not in existing]
    if new:
        mapping = (await load_settings(session)).user_id_mapping
        await merge.load(
            session,
            [platform_user(m, mapping) for m in new],
            mapping,
            exclude=(user.id for user in existing.values()),
        )
    return merge


async def _store_once(
    sessionmaker: async_sessionmaker, messages: list[UserMessage], via_batch: bool
) -> StoreResult:
    changed = new_events = 0
    async with sessionmaker() as session, session.begin():
        existing = await find_users(session, messages)
        merge = await _webhook_users_to_merge(session, messages, existing)
        now = utcnow()
        for position, message in enumerate(messages):
            data_hash = message.data_hash()
            user = existing.get(position)
            if user is None:
                user_id = new_user_id(message)
                user = User(
                    id=user_id,
                    version=0,
                    pending=False,
                    attempts=0,
                    cio_ref=merge.cio_ref_for(user_id),
                )
                session.add(user)
                _apply(user, message, data_hash)
                await session.flush()
                is_changed = True
            else:
                is_changed = user.data_hash != data_hash
                if is_changed:
                    _apply(user, message, data_hash)
            inserted = await _insert_events(session, user.id, message)
            new_events += inserted
            if is_changed or inserted or via_batch:
                sync_state.mark_pending(user, now, via_batch=via_batch)
                changed += 1
        await merge.apply(session)
        await record_catalog(session, messages)
    return StoreResult(accepted=len(messages), changed=changed, new_events=new_events)


async def _store_retrying(
    sessionmaker: async_sessionmaker, messages: list[UserMessage], via_batch: bool
) -> StoreResult:
    for attempt in range(1, _MAX_TRANSACTION_TRIES + 1):
        try:
            return await _store_once(sessionmaker, messages, via_batch)
        except IntegrityError:
            if attempt == _MAX_TRANSACTION_TRIES:
                raise
    raise AssertionError("unreachable")


async def _store_one_by_one(
    sessionmaker: async_sessionmaker, messages: list[UserMessage], via_batch: bool
) -> StoreResult:
    """Each message in a transaction of its own: one the database refuses is rejected with
    the database's reason, and the others are stored."""
    result = StoreResult()
    for message in messages:
        try:
            result.add(await _store_retrying(sessionmaker, [message], via_batch))
        except Exception as exc:
            if is_transient(exc):
                raise
            reason = failure_reason(exc)
            log.warning("message rejected", extra={"index": message.index, "reason": reason})
            result.rejected.append({"index": message.index, "error": reason})
    return result


async def store_messages(
    sessionmaker: async_sessionmaker, messages: list[UserMessage], *, via_batch: bool
) -> StoreResult:
    """Store users and their events, committed when this returns.

    Each transaction holds at most :data:`MAX_MESSAGES_PER_TRANSACTION` messages, so that a
    large notification never keeps the database from others (the webhook inbox above all)
    for long; a storing again of the same notification changes nothing. A transaction the
    database refuses is replayed message by message, and only the refused ones are rejected.
    """
    result = StoreResult()
    for start in range(0, len(messages), MAX_MESSAGES_PER_TRANSACTION):
        chunk = messages[start : start + MAX_MESSAGES_PER_TRANSACTION]
        if start:
            # Whoever waits for the connection (a webhook's commit) takes it before the next
            # chunk does.
            await asyncio.sleep(0)
        try:
            result.add(await _store_retrying(sessionmaker, chunk, via_batch))
        except Exception as exc:
            if is_transient(exc) or (len(chunk) == 1 and not isinstance(exc, IntegrityError)):
                raise
            result.add(await _store_one_by_one(sessionmaker, chunk, via_batch))
    return result
