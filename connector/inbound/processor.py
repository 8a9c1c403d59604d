"""Turns stored webhook deliveries into tracked events on users (and forward-outbox entries).

Deliveries are claimed from the database like outbound users are, so several instances can
process side by side and none processes a delivery twice. A background worker wakes up when a
webhook is stored; the scheduler's sweep picks up anything left behind (e.g. after a restart).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from connector.db.models import ForwardMessage, TrackedEvent, WebhookDelivery
from connector.db.types import utcnow
from connector.forwarding.message import segment_track
from connector.inbound.identity import find_or_create_user
from connector.inbound.mapping import InboundEvent, InvalidWebhook, map_webhook
from connector.metrics import Metrics
from connector.settings import ConnectorSettings
from connector.settings_store import SettingsStore

log = logging.getLogger("connector.inbound")

# Short transactions: on SQLite the webhook inbox waits for the connection meanwhile.
BATCH_SIZE = 50


@dataclass
class ProcessSummary:
    processed: int = 0
    ignored: int = 0
    unmatched: int = 0
    invalid: int = 0


def _claimable(now: datetime):
    return (WebhookDelivery.status == "pending") & or_(
        WebhookDelivery.claimed_until.is_(None), WebhookDelivery.claimed_until < now
    )


class InboundProcessor:
    def __init__(
        self,
        sessionmaker: async_sessionmaker,
        settings: SettingsStore,
        metrics: Metrics,
        lease_seconds: float,
    ):
        self._sessionmaker = sessionmaker
        self._settings = settings
        self._metrics = metrics
        self._lease = timedelta(seconds=lease_seconds)
        self._wakeup = asyncio.Event()
        self._lock = asyncio.Lock()
        self._task: asyncio.Task | None = None

    def wake(self) -> None:
        self._wakeup.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._worker(), name="inbound-processor")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _worker(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            try:
                await self.process_pending()
            except Exception:
                log.exception("processing webhooks failed; the sweep will try again")

    async def process_pending(self) -> ProcessSummary:
        """Process every delivery that is waiting; one instance-local pass at a time."""
        summary = ProcessSummary()
        async with self._lock:
            while True:
                claimed = await self._claim()
                if not claimed:
                    return summary
                await self._process(claimed, summary)

    async def _claim(self) -> list[int]:
        now = utcnow()
        async with self._sessionmaker() as session, session.begin():
            # MATERIALIZED: see OutboundRepository.claim.
            due = (
                select(WebhookDelivery.id)
                .where(_claimable(now))
                .order_by(WebhookDelivery.id)
                .limit(BATCH_SIZE)
                .with_for_update(skip_locked=True)
                .cte("due")
                .prefix_with("MATERIALIZED", dialect="postgresql")
            )
            result = await session.execute(
                update(WebhookDelivery)
                .where(WebhookDelivery.id.in_(select(due.c.id)), _claimable(now))
                .values(claimed_until=now + self._lease)
                .returning(WebhookDelivery.id)
                .execution_options(synchronize_session=False)
            )
            return [row[0] for row in result]

    async def _process(self, ids: list[int], summary: ProcessSummary) -> None:
        settings = await self._settings.load()
        allowed = set(settings.incoming_metrics) if settings.incoming_metrics is not None else None
        async with self._sessionmaker() as session, session.begin():
            deliveries = (
                await session.scalars(
                    select(WebhookDelivery)
                    .where(WebhookDelivery.id.in_(ids))
                    .order_by(WebhookDelivery.id)
                )
            ).all()
            for delivery in deliveries:
                outcome = await self._process_one(session, delivery, settings, allowed)
                setattr(summary, outcome, getattr(summary, outcome) + 1)
                self._metrics.webhooks.labels(outcome, delivery.event_name or "").inc()

    async def _process_one(
        self,
        session: AsyncSession,
        delivery: WebhookDelivery,
        settings: ConnectorSettings,
        allowed: set[str] | None,
    ) -> str:
        delivery.claimed_until = None
        delivery.processed_at = utcnow()
        try:
            payload = json.loads(delivery.body)
            payload.setdefault("event_id", delivery.event_id)
            event = map_webhook(payload)
        except (InvalidWebhook, ValueError, TypeError, AttributeError) as exc:
            delivery.status = "invalid"
            delivery.error = str(exc)[:500]
            return "invalid"
        delivery.event_name = event.name
        if allowed is not None and event.metric_key not in allowed:
            delivery.status = "ignored"
            return "ignored"
        user_id = None
        if not event.identity.is_empty:
            user = await find_or_create_user(session, event.identity, settings.user_id_mapping)
            user_id = user.id
        tracked_id = await _insert_tracked(session, event, user_id, delivery.received_at)
        if tracked_id is not None and settings.forward_url:
            session.add(
                ForwardMessage(
                    tracked_event_id=tracked_id,
                    payload=segment_track(
                        event_id=event.event_id,
                        name=event.name,
                        properties=event.properties,
                        occurred_at=event.occurred_at or delivery.received_at,
                        customer_id=event.identity.customer_id,
                        email=event.identity.email,
                        prefix=settings.forward_event_prefix,
                    ),
                    status="pending",
                    attempts=0,
                    next_attempt_at=utcnow(),
                )
            )
        delivery.status = "processed" if user_id else "unmatched"
        return delivery.status


async def _insert_tracked(
    session: AsyncSession, event: InboundEvent, user_id: str | None, received_at: datetime
) -> int | None:
    """Insert the tracked event once; None when it exists already (a re-processed delivery)."""
    insert = pg_insert if session.bind.dialect.name == "postgresql" else sqlite_insert
    result = await session.execute(
        insert(TrackedEvent)
        .values(
            event_id=event.event_id,
            user_id=user_id,
            name=event.name,
            object_type=event.object_type,
            metric=event.metric,
            properties=event.properties,
            context=event.context,
            occurred_at=event.occurred_at or received_at,
            customer_id=event.identity.customer_id,
            email=event.identity.email,
            cio_id=event.identity.cio_id,
            created_at=utcnow(),
        )
        .on_conflict_do_nothing(index_elements=["event_id"])
        .returning(TrackedEvent.id)
    )
    return result.scalar()
