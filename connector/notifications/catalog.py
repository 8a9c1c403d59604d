"""Remembers which segments, attribute names and event names the platform has sent."""

from __future__ import annotations

from collections.abc import Collection

from sqlalchemy.ext.asyncio import AsyncSession

from connector.db.models import CatalogEntry
from connector.db.types import utcnow
from connector.db.upsert import insert
from connector.notifications.parse import UserMessage

# Attribute names longer than this are not offered in the pickers (and would not fit the key).
MAX_KEY_LENGTH = 255


def catalog_rows(messages: list[UserMessage]) -> list[dict[str, str | None]]:
    """One row per distinct (kind, key): segment ids with names, attribute paths, event names."""
    rows: dict[tuple[str, str], str | None] = {}
    for message in messages:
        for segment in message.segments:
            name = segment.get("name")
            rows[("segment", str(segment["id"]))] = name[:MAX_KEY_LENGTH] if name else None
        for name in message.attributes:
            rows.setdefault(("attribute", name), None)
        for name in message.account:
            rows.setdefault(("attribute", f"account.{name}"), None)
        for event in message.events:
            rows.setdefault(("event", event.name), None)
    return [
        {"kind": kind, "key": key, "label": label}
        for (kind, key), label in sorted(rows.items())
        if len(key) <= MAX_KEY_LENGTH
    ]


async def record_catalog(
    session: AsyncSession,
    messages: list[UserMessage],
    recorded: Collection[tuple[str, str, str | None]] = (),
) -> set[tuple[str, str, str | None]]:
    """Record what ``messages`` hold but ``recorded`` (what the earlier transactions of the
    same notification recorded) does not: one (executemany) statement. Returns the
    ``(kind, key, label)`` of the rows written."""
    rows = [
        row
        for row in catalog_rows(messages)
        if (row["kind"], row["key"], row["label"]) not in recorded
    ]
    if not rows:
        return set()
    now = utcnow()
    for row in rows:
        row["last_seen_at"] = now
    statement = insert(session, CatalogEntry)
    statement = statement.on_conflict_do_update(
        index_elements=["kind", "key"],
        set_={"label": statement.excluded.label, "last_seen_at": statement.excluded.last_seen_at},
    )
    await session.execute(statement, rows)
    return {(row["kind"], row["key"], row["label"]) for row in rows}
