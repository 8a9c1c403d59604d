"""Leasing rows of a work queue so that several instances never take the same row.

One statement: ``UPDATE … SET <lease> WHERE id IN (SELECT id … LIMIT n FOR UPDATE SKIP LOCKED)
AND <claimable> RETURNING …``. On PostgreSQL the locked subquery makes concurrent claimers skip
each other's rows; SQLite ignores the locking clause, and its ``BEGIN IMMEDIATE`` transactions
serialise the claims instead. On PostgreSQL, repeating the condition in the UPDATE keeps a row
that another claimer took in between from being taken twice. SQLite needs no such repeat (no
other writer runs between the subquery and the update), and must not have it: with it,
SQLite's planner walks the claimable rows' index instead of the primary key, every row
pending, so each claim cost grew with the queue (100 ms at 1,000,000 pending users).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Result, and_, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession


def unclaimed(claimed_until: Any, now: datetime) -> Any:
    """The rows of a queue that no instance holds: never claimed, or their lease ran out."""
    return or_(claimed_until.is_(None), claimed_until < now)


async def claim_rows(
    session: AsyncSession,
    model: Any,
    *,
    claimable: Any,
    order_by: Sequence[Any],
    limit: int,
    values: dict[str, Any],
    returning: Sequence[Any],
) -> Result[Any]:
    """Set ``values`` (the lease) on up to ``limit`` claimable rows of ``model``, in
    ``order_by`` order, and return the ``returning`` columns of the rows taken."""
    # MATERIALIZED: PostgreSQL may otherwise run the locking subquery again for the update,
    # and each run skips the rows the previous one took, overshooting ``limit``.
    due = (
        select(model.id)
        .where(claimable)
        .order_by(*order_by)
        .limit(limit)
        .with_for_update(skip_locked=True)
        .cte("due")
        .prefix_with("MATERIALIZED", dialect="postgresql")
    )
    taken = model.id.in_(select(due.c.id))
    if session.bind.dialect.name != "sqlite":
        taken = and_(taken, claimable)
    return await session.execute(
        update(model)
        .where(taken)
        .values(**values)
        .returning(*returning)
        .execution_options(synchronize_session=False)
    )
