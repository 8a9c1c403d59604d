"""Writes parsed platform messages to the database and marks changed users pending.

A chunk of messages is stored set-based, in one transaction: one query finds the stored users
its messages are about (:func:`connector.users.identity.find_users`), then the new users, the
events, the changed users and the pending marks are each written with one statement for the
whole chunk, whatever its size.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Integer, bindparam, update
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
from connector.users.identity import (
    StoredUser,
    WebhookUserMerge,
    find_users,
    platform_user,
    resolve_messages,
)

log = logging.getLogger("connector.notifications")

# Two instances creating the same new user at once: the loser's transaction is replayed.
_MAX_TRANSACTION_TRIES = 3
# Messages per transaction. On SQLite the process has one connection, and webhooks wait for it
# to be acknowledged (Customer.io gives them 4 seconds): 100 users take a few tens of ms.
MAX_MESSAGES_PER_TRANSACTION = 100

_EVENTS = UserEvent.__table__
_USERS = User.__table__
# The columns of a user's data (what _Write.data_row holds).
_DATA_COLUMNS = (
    "external_id",
    "email",
    "anonymous_ids",
    "attributes",
    "account",
    "segments",
    "indexed_at",
    "data_hash",
)


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


@dataclass(eq=False)
class _Write:
    """What one chunk does to one user: its messages folded in order."""

    id: str
    new: bool
    data_hash: str | None
    """The user's as the messages so far leave it."""
    data: UserMessage | None = None
    """The message whose data is written; None: unchanged."""
    marks: int = 0
    """Messages that marked it pending (each a new version)."""

    def data_row(self) -> dict[str, Any]:
        assert self.data is not None
        message = self.data
        return {
            "external_id": message.external_id,
            "email": message.email,
            "anonymous_ids": message.anonymous_ids,
            "attributes": message.attributes,
            "account": message.account,
            "segments": message.segments,
            "indexed_at": message.indexed_at,
            "data_hash": self.data_hash,
        }


def _fold(
    messages: list[UserMessage], user_ids: list[str], stored: dict[str, StoredUser]
) -> tuple[dict[str, _Write], list[bool]]:
    """Each user's write, and whether each message changed its user's data."""
    writes: dict[str, _Write] = {}
    changed: list[bool] = []
    for message, user_id in zip(messages, user_ids, strict=True):
        write = writes.get(user_id)
        if write is None:
            known = stored.get(user_id)
            data_hash = known.data_hash if known else None
            write = _Write(user_id, new=known is None, data_hash=data_hash)
            writes[user_id] = write
        data_hash = message.data_hash()
        is_changed = write.data_hash != data_hash
        if is_changed:
            write.data, write.data_hash = message, data_hash
        changed.append(is_changed)
    return writes, changed


def _marking(via_batch: bool, *, with_data: bool) -> Any:
    values = sync_state.mark_pending_values(
        bindparam("b_now", type_=_USERS.c.pending_since.type),
        versions=bindparam("b_versions", type_=Integer),
        via_batch=via_batch,
    )
    if with_data:
        values.update(
            {name: bindparam(f"b_{name}", type_=_USERS.c[name].type) for name in _DATA_COLUMNS}
        )
    return update(_USERS).where(_USERS.c.id == bindparam("b_id")).values(values)


async def _insert_events(
    session: AsyncSession, messages: list[UserMessage], user_ids: list[str], now: datetime
) -> list[int]:
    """Insert the events none of the users has yet (one statement); how many each message
    brought."""
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
        for message, user_id in zip(messages, user_ids, strict=True)
        for event in message.events
    ]
    if not rows:
        return [0] * len(messages)
    statement = (
        insert(session, _EVENTS)
        .on_conflict_do_nothing(index_elements=["user_id", "event_id"])
        .returning(_EVENTS.c.user_id, _EVENTS.c.event_id)
    )
    inserted = {tuple(row) for row in await session.execute(statement, rows)}
    counts = []
    for message, user_id in zip(messages, user_ids, strict=True):
        count = 0
        for event in message.events:
            key = (user_id, event.event_id)
            if key in inserted:
                inserted.discard(key)
                count += 1
        counts.append(count)
    return counts


@dataclass
class _Call:
    """One :func:`store_messages` call."""

    sessionmaker: async_sessionmaker
    via_batch: bool
    catalog: set[tuple[str, str, str | None]] = field(default_factory=set)
    """The catalog rows its committed transactions recorded (not written again)."""
    user_id_mapping: str | None = None
    """The setting, as the first transaction that needed it read it."""


async def _webhook_users_to_merge(
    session: AsyncSession, call: _Call, messages: list[UserMessage], writes: dict[str, _Write]
) -> WebhookUserMerge:
    """The users created from webhooks that the chunk's users new by ``user.id`` take over."""
    merge = WebhookUserMerge()
    new = [m for m in messages if m.key and writes[m.key].new]
    if new:
        if call.user_id_mapping is None:
            call.user_id_mapping = (await load_settings(session)).user_id_mapping
        mapping = call.user_id_mapping
        await merge.load(
            session,
            [platform_user(m, mapping) for m in new],
            mapping,
            exclude=(write.id for write in writes.values() if not write.new),
        )
    return merge


async def _insert_users(
    session: AsyncSession,
    writes: dict[str, _Write],
    merge: WebhookUserMerge,
    now: datetime,
    via_batch: bool,
) -> None:
    """Insert the chunk's new users, pending: one statement."""
    # In the order of their ids: two notifications creating the same users take their locks
    # in one order, and wait for each other instead of deadlocking.
    new = sorted((write for write in writes.values() if write.new), key=lambda w: w.id)
    if not new:
        return
    state = sync_state.first_pending_state(now, via_batch=via_batch)
    rows = [{"id": w.id, **w.data_row(), **state, "cio_ref": merge.cio_ref_for(w.id)} for w in new]
    await session.execute(insert(session, _USERS), rows)


async def _update_users(
    session: AsyncSession, writes: dict[str, _Write], now: datetime, via_batch: bool
) -> None:
    """Write the changed users' data and mark them pending, one version per mark: at most two
    (executemany) statements."""
    with_data, marks_only = [], []
    for write in writes.values():
        # A new user's first version is the row inserted.
        versions = write.marks - 1 if write.new else write.marks
        if not versions:
            continue
        row = {"b_id": write.id, "b_now": now, "b_versions": versions}
        if write.new or write.data is None:
            marks_only.append(row)
        else:
            with_data.append(row | {f"b_{k}": v for k, v in write.data_row().items()})
    if with_data:
        await session.execute(_marking(via_batch, with_data=True), with_data)
    if marks_only:
        await session.execute(_marking(via_batch, with_data=False), marks_only)


async def _store_once(call: _Call, messages: list[UserMessage]) -> StoreResult:
    async with call.sessionmaker() as session, session.begin():
        stored = await find_users(session, messages)
        user_ids = resolve_messages(messages, stored)
        writes, changed = _fold(messages, user_ids, {user.id: user for user in stored})
        merge = await _webhook_users_to_merge(session, call, messages, writes)
        now = utcnow()
        await _insert_users(session, writes, merge, now, call.via_batch)
        inserted = await _insert_events(session, messages, user_ids, now)
        for user_id, is_changed, count in zip(user_ids, changed, inserted, strict=True):
            if is_changed or count or call.via_batch:
                writes[user_id].marks += 1
        await _update_users(session, writes, now, call.via_batch)
        await merge.apply(session)
        recorded = await record_catalog(session, messages, call.catalog)
    call.catalog.update(recorded)
    return StoreResult(
        accepted=len(messages),
        changed=sum(write.marks for write in writes.values()),
        new_events=sum(inserted),
    )


async def _store_retrying(call: _Call, messages: list[UserMessage]) -> StoreResult:
    for attempt in range(1, _MAX_TRANSACTION_TRIES + 1):
        try:
            return await _store_once(call, messages)
        except IntegrityError:
            if attempt == _MAX_TRANSACTION_TRIES:
                raise
    raise AssertionError("unreachable")


async def _store_one_by_one(call: _Call, messages: list[UserMessage]) -> StoreResult:
    """Each message in a transaction of its own: one the database refuses is rejected with
    the database's reason, and the others are stored."""
    result = StoreResult()
    for message in messages:
        try:
            result.add(await _store_retrying(call, [message]))
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
    call = _Call(sessionmaker, via_batch)
    result = StoreResult()
    for start in range(0, len(messages), MAX_MESSAGES_PER_TRANSACTION):
        chunk = messages[start : start + MAX_MESSAGES_PER_TRANSACTION]
        if start:
            # Whoever waits for the connection (a webhook's commit) takes it before the next
            # chunk does.
            await asyncio.sleep(0)
        try:
            result.add(await _store_retrying(call, chunk))
        except Exception as exc:
            if is_transient(exc) or (len(chunk) == 1 and not isinstance(exc, IntegrityError)):
                raise
            result.add(await _store_one_by_one(call, chunk))
    return result
