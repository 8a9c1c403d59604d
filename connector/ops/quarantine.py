"""What the pipelines set aside, and giving it another chance.

Each pipeline quarantines a record it cannot process, with the reason, and goes on: a user
``failed`` for good, a webhook delivery ``invalid``, a forwarding outbox message ``failed``.
:func:`quarantined` counts them for ``/status`` and the settings page; :func:`retry_failed`
(``POST /api/retry-failed``, ``connector retry-failed``) makes them pending again, once
whatever was wrong (a setting, a bug, the destination) has been fixed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from connector.db.models import ForwardMessage, User, UserEvent, WebhookDelivery
from connector.db.sync_state import failed_for_good, retry_failed_users
from connector.db.types import utcnow


@dataclass(frozen=True)
class Quarantined:
    count: int
    reason: str | None
    """The reason of the most recent one."""

    def as_dict(self) -> dict[str, Any]:
        return {"count": self.count, "reason": self.reason}


_QUEUES: dict[str, tuple[Any, Any, Any, Any]] = {
    # name: (model, condition, reason column, newest first)
    "users": (User, failed_for_good(), User.last_error, User.updated_at),
    "webhooks": (
        WebhookDelivery,
        WebhookDelivery.status == "invalid",
        WebhookDelivery.error,
        WebhookDelivery.id,
    ),
    "forwarding": (
        ForwardMessage,
        ForwardMessage.status == "failed",
        ForwardMessage.last_error,
        ForwardMessage.id,
    ),
}


async def quarantined(session: AsyncSession) -> dict[str, Quarantined]:
    """How many records each pipeline set aside, and the latest reason."""
    summary: dict[str, Quarantined] = {}
    for name, (model, condition, reason, newest) in _QUEUES.items():
        count = await session.scalar(select(func.count()).select_from(model).where(condition))
        latest = None
        if count:
            latest = await session.scalar(
                select(reason).where(condition).order_by(newest.desc()).limit(1)
            )
        summary[name] = Quarantined(count or 0, latest)
    return summary


async def retry_failed(sessionmaker: async_sessionmaker) -> dict[str, int]:
    """Make every quarantined record pending again, with its attempts reset; returns how many
    of each kind. A retried user sends its failed events again too."""
    now = utcnow()
    async with sessionmaker() as session, session.begin():
        users = await retry_failed_users(session, now)
        if users:
            await session.execute(
                update(UserEvent)
                .where(UserEvent.user_id.in_(users), UserEvent.status == "failed")
                .values(status="pending", reason=None)
            )
        webhooks = await session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.status == "invalid")
            .values(status="pending", error=None, claimed_until=None, processed_at=None)
        )
        forwarding = await session.execute(
            update(ForwardMessage)
            .where(ForwardMessage.status == "failed")
            .values(status="pending", attempts=0, next_attempt_at=now, claimed_until=None)
        )
    return {
        "users": len(users),
        "webhooks": webhooks.rowcount or 0,
        "forwarding": forwarding.rowcount or 0,
    }
