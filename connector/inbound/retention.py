"""Raw webhook deliveries are kept ``inbound.retention_days``; the tracked events stay."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import delete
from sqlalchemy.ext.asyncio import async_sessionmaker

from connector.db.models import WebhookDelivery
from connector.db.types import utcnow


async def purge_deliveries(sessionmaker: async_sessionmaker, retention_days: int) -> int:
    """Delete processed deliveries older than the retention; pending ones are never purged."""
    cutoff = utcnow() - timedelta(days=retention_days)
    async with sessionmaker() as session, session.begin():
        result = await session.execute(
            delete(WebhookDelivery).where(
                WebhookDelivery.received_at < cutoff, WebhookDelivery.status != "pending"
            )
        )
        return result.rowcount or 0
