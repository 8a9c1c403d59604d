"""``INSERT … ON CONFLICT`` on whichever database the session is bound to.

PostgreSQL's and SQLite's dialects each have an ``insert()`` with the same
``on_conflict_do_nothing`` / ``on_conflict_do_update`` / ``excluded`` API; the core ``insert()``
has none of it. This is the one place that picks between them.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession


def insert(session: AsyncSession, table: Any) -> Any:
    """An insert into ``table`` (a model or a ``Table``) that can say what to do on conflict."""
    if session.bind.dialect.name == "postgresql":
        return postgresql.insert(table)
    return sqlite.insert(table)
