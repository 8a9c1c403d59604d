"""Turns stored webhook deliveries into tracked events on users (and forward-outbox entries).

Deliveries are claimed from the database like outbound users are, so several instances can
process side by side and none processes a delivery twice. A background worker wakes up when a
webhook is stored; the scheduler's sweep picks up anything left behind (e.g. after a restart).

A claimed batch is processed set-based: every delivery is parsed and mapped first (no I/O),
then one transaction resolves the users of the whole batch (see
:mod:`connector.users.identity`), inserts its tracked events and outbox messages with one
statement each and marks the deliveries done with at most two. The receiver goes first: each
batch is followed by a pause in proportion to the CPU time it took, by how hard the receiver is
working (:meth:`InboundProcessor.give_way_to`): none when no webhook is arriving, as long as the
batch while they arrive at a rate the receiver takes in its stride (so processing keeps up, at
1,000 webhooks/s among others), nineteen times as long while webhooks queue up for the inbox's
commits (a burst at full speed: processing gets a twentieth of the process, falls behind, and
catches up once the burst is over), but only twice as long once the batch's oldest webhook is
more than :data:`LAG_BUDGET_SECONDS` old, so that a long burst (or a slow machine, on which
commits queue up at lower rates too) cannot leave processing behind for longer than that.

The receiver comes first because Customer.io holds back every webhook for an hour after one
that timed out, while a tracked event that shows up a minute late harms nobody.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from sqlalchemy import bindparam, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from connector.db.claims import claim_rows, unclaimed
from connector.db.models import TrackedEvent, WebhookDelivery
from connector.db.types import utcnow
from connector.db.upsert import insert
from connector.forwarding.outbox import ForwardedEvent, enqueue
from connector.inbound.mapping import (
    InboundEvent,
    InvalidWebhook,
    map_webhook,
    webhook_event_label,
)
from connector.ops.metrics import Metrics
from connector.rules import safe_json
from connector.rules.failures import failure_reason, is_transient
from connector.settings.model import ConnectorSettings
from connector.settings.store import SettingsStore
from connector.users.identity import resolve_users

log = logging.getLogger("connector.inbound")

# Deliveries per transaction. On SQLite the webhook inbox waits for the connection meanwhile,
# so a batch must stay short (a few milliseconds).
BATCH_SIZE = 100
# A wake-up waits this long before processing, so that one batch takes what arrives meanwhile
# (each batch costs a few round trips to the database whatever its size).
GATHER_SECONDS = 0.1
# A batch that took t seconds is followed by a pause of factor * t, so processing takes at most
# 1/(1 + factor) of the event loop: half while webhooks arrive, a twentieth while the receiver
# is saturated (webhooks queue for the inbox's commits: SATURATED_GROUP_SIZE or more a commit).
GIVE_WAY_FACTOR = 1.0
SATURATED_GIVE_WAY_FACTOR = 19.0
SATURATED_GROUP_SIZE = 4.0
# A batch whose oldest webhook arrived longer ago than this is behind: while saturated,
# processing then takes a third of the loop (BEHIND_GIVE_WAY_FACTOR) until it has caught up.
LAG_BUDGET_SECONDS = 60.0
BEHIND_GIVE_WAY_FACTOR = 2.0
# The longest pause, so that one slow batch (a database hiccup) cannot stall processing.
MAX_GIVE_WAY_SECONDS = 0.5
# Settings read for a batch serve the batches of the next second: on SQLite a read is a
# transaction's worth of round trips to aiosqlite's thread while the inbox waits for the
# connection. A change saved on this instance applies at once (SettingsStore.load_recent).
SETTINGS_MAX_AGE_SECONDS = 1.0

DELIVERIES = WebhookDelivery.__table__
TRACKED = TrackedEvent.__table__


WebhookOutcome = Literal["processed", "ignored", "unmatched", "invalid"]
"""What became of a delivery (its stored status once done; a field of :class:`ProcessSummary`)."""


@dataclass
class ProcessSummary:
    processed: int = 0
    ignored: int = 0
    unmatched: int = 0
    invalid: int = 0

    def count(self, outcome: WebhookOutcome, n: int = 1) -> None:
        """Add ``n`` deliveries that ended ``outcome``."""
        match outcome:
            case "processed":
                self.processed += n
            case "ignored":
                self.ignored += n
            case "unmatched":
                self.unmatched += n
            case "invalid":
                self.invalid += n
            case _:
                raise ValueError(f"not a webhook outcome: {outcome!r}")


@dataclass(eq=False)
class _Delivery:
    id: int
    event_id: str
    body: str
    received_at: datetime
    status: str = "pending"
    event_name: str | None = None
    error: str | None = None
    event: InboundEvent | None = None
    tracked_at: datetime | None = None
    """When its tracked event was stored (by this delivery, not by an earlier one)."""


def _claimable(now: datetime):
    return (WebhookDelivery.status == "pending") & unclaimed(WebhookDelivery.claimed_until, now)


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
        self._receiver_load: Callable[[], float] | None = None

    def give_way_to(self, load: Callable[[], float]) -> None:
        """Pause after each batch as ``load()`` says the receiver is working: 0 when idle, else
        the webhooks it commits at a time (:attr:`connector.inbound.inbox.InboxWriter.load`)."""
        self._receiver_load = load

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
            # Webhooks arriving meanwhile join the batch: one pass per burst, not per webhook.
            await asyncio.sleep(GATHER_SECONDS)
            self._wakeup.clear()
            try:
                await self.process_pending()
            except Exception:
                log.exception("processing webhooks failed; the sweep will try again")

    async def process_pending(self) -> ProcessSummary:
        """Process every delivery that is waiting; one instance-local pass at a time."""
        summary = ProcessSummary()
        async with self._lock:
            spent, behind = 0.0, False
            while True:
                await self._give_way(spent, behind)
                # CPU time of the event loop's thread, not wall time: a batch mostly waits for
                # the database, and the loop serves webhooks meanwhile; what the receiver loses
                # is the CPU the batch takes (plus what requests took in between, a little at
                # moderate rates).
                started = time.thread_time()
                claimed = await self._claim()
                if claimed:
                    await self._process(claimed, summary)
                    oldest = utcnow() - claimed[0].received_at
                    behind = oldest.total_seconds() > LAG_BUDGET_SECONDS
                spent = time.thread_time() - started
                if len(claimed) < BATCH_SIZE:
                    # Nothing more was waiting; what arrives from now on wakes the worker.
                    return summary

    async def _give_way(self, spent: float, behind: bool) -> None:
        """Let the event loop serve requests; while the receiver is working, pause
        :data:`GIVE_WAY_FACTOR` times ``spent`` (the last batch's time), or while it is
        saturated :data:`SATURATED_GIVE_WAY_FACTOR` times (:data:`BEHIND_GIVE_WAY_FACTOR` when
        processing is ``behind``), at most :data:`MAX_GIVE_WAY_SECONDS`."""
        load = self._receiver_load() if self._receiver_load is not None else 0.0
        if not load:
            await asyncio.sleep(0)
            return
        factor = GIVE_WAY_FACTOR
        if load >= SATURATED_GROUP_SIZE:
            factor = BEHIND_GIVE_WAY_FACTOR if behind else SATURATED_GIVE_WAY_FACTOR
        await asyncio.sleep(min(spent * factor, MAX_GIVE_WAY_SECONDS))

    async def _claim(self) -> list[_Delivery]:
        now = utcnow()
        async with self._sessionmaker() as session, session.begin():
            result = await claim_rows(
                session,
                WebhookDelivery,
                claimable=_claimable(now),
                order_by=(WebhookDelivery.id,),
                limit=BATCH_SIZE,
                values={"claimed_until": now + self._lease},
                returning=(
                    WebhookDelivery.id,
                    WebhookDelivery.event_id,
                    WebhookDelivery.body,
                    WebhookDelivery.received_at,
                ),
            )
            claimed = [_Delivery(*row) for row in result]
        claimed.sort(key=lambda delivery: delivery.id)
        return claimed

    async def _process(self, deliveries: list[_Delivery], summary: ProcessSummary) -> None:
        settings = await self._settings.load_recent(SETTINGS_MAX_AGE_SECONDS)
        allowed = set(settings.incoming_metrics) if settings.incoming_metrics is not None else None
        events = [d for d in deliveries if _map(d, allowed)]
        try:
            async with self._sessionmaker() as session, session.begin():
                if events:
                    await self._track(session, events, settings)
                await _finish(session, deliveries)
        except Exception as exc:
            if is_transient(exc):
                raise
            log.warning("a batch of %d webhooks failed; processing them one by one", len(events))
            await self._process_one_by_one(deliveries, events, settings)
        for delivery in deliveries:
            if delivery.tracked_at is not None and delivery.status in ("processed", "unmatched"):
                lag = (delivery.tracked_at - delivery.received_at).total_seconds()
                self._metrics.webhook_lag_seconds.observe(max(lag, 0.0))
        counts = Counter((d.status, d.event_name or "") for d in deliveries)
        for (outcome, name), count in counts.items():
            summary.count(outcome, count)
            self._metrics.webhook_outcome(outcome, webhook_event_label(name), count)

    async def _process_one_by_one(
        self, deliveries: list[_Delivery], events: list[_Delivery], settings: ConnectorSettings
    ) -> None:
        """Each event in a transaction of its own, so that one the database refuses is
        quarantined (``invalid``, with the database's reason) and the others go on."""
        for delivery in events:
            try:
                async with self._sessionmaker() as session, session.begin():
                    await self._track(session, [delivery], settings)
                    await _finish(session, [delivery])
            except Exception as exc:
                if is_transient(exc):
                    raise
                delivery.status = "invalid"
                delivery.error = failure_reason(exc)
                log.warning(
                    "webhook quarantined",
                    extra={"delivery": delivery.id, "reason": delivery.error},
                )
                async with self._sessionmaker() as session, session.begin():
                    await _finish(session, [delivery])
        rest = [d for d in deliveries if d not in events]
        if rest:
            async with self._sessionmaker() as session, session.begin():
                await _finish(session, rest)

    async def _track(
        self, session: AsyncSession, deliveries: list[_Delivery], settings: ConnectorSettings
    ) -> None:
        """Users, tracked events and outbox messages of the mapped ``deliveries``."""
        identified = [d for d in deliveries if not d.event.identity.is_empty]
        user_ids = await resolve_users(
            session, [d.event.identity for d in identified], settings.user_id_mapping
        )
        user_of = {d.id: user_id for d, user_id in zip(identified, user_ids, strict=True)}
        now = utcnow()
        # The first delivery of each event id inserts it (the sequential outcome, should two
        # deliveries of one batch carry the same event id).
        first: dict[str, _Delivery] = {}
        for delivery in deliveries:
            first.setdefault(delivery.event.event_id, delivery)
            delivery.status = "processed" if delivery.id in user_of else "unmatched"
        rows = [
            {
                "event_id": event_id,
                "user_id": user_of.get(d.id),
                "name": d.event.name,
                "object_type": d.event.object_type,
                "metric": d.event.metric,
                "properties": d.event.properties,
                "context": d.event.context,
                "occurred_at": d.event.occurred_at or d.received_at,
                "customer_id": d.event.identity.customer_id,
                "email": d.event.identity.email,
                "cio_id": d.event.identity.cio_id,
                "created_at": now,
            }
            for event_id, d in sorted(first.items())
        ]
        # None of the rows when the events exist already (a re-processed delivery).
        result = await session.execute(
            insert(session, TRACKED)
            .on_conflict_do_nothing(index_elements=["event_id"])
            .returning(TRACKED.c.id, TRACKED.c.event_id),
            rows,
        )
        tracked = dict(sorted((event_id, tracked_id) for tracked_id, event_id in result))
        for event_id in tracked:
            first[event_id].tracked_at = now
        if not tracked or not settings.forward_url:
            return
        await enqueue(
            session,
            [
                ForwardedEvent(
                    tracked_event_id=tracked_id,
                    event_id=event_id,
                    name=first[event_id].event.name,
                    properties=first[event_id].event.properties,
                    occurred_at=first[event_id].event.occurred_at or first[event_id].received_at,
                    customer_id=first[event_id].event.identity.customer_id,
                    email=first[event_id].event.identity.email,
                )
                for event_id, tracked_id in tracked.items()
            ],
            settings.forward_event_prefix,
        )


def _map(delivery: _Delivery, allowed: set[str] | None) -> bool:
    """Parse and map ``delivery`` (no I/O); True when it becomes a tracked event, else its
    outcome (``invalid`` or ``ignored``) is set.

    The mapping sees a cleaned copy of the payload: text that cannot be stored (NUL, lone
    surrogates) is repaired, and an ``event_id`` made of such text is replaced by the
    inbox's key, so that nothing Customer.io sent is refused for it.
    """
    try:
        payload = safe_json.loads(delivery.body)
        if not isinstance(payload, dict):
            raise InvalidWebhook("the body is not a JSON object")
        event_id = payload.get("event_id")
        if event_id is None or (isinstance(event_id, str) and not safe_json.is_storable(event_id)):
            payload["event_id"] = delivery.event_id
        if safe_json.may_hold_unstorable_text(delivery.body):
            payload = safe_json.clean(payload)
        event = map_webhook(payload)
    except ValueError as exc:  # InvalidWebhook, UnsafeJSON: the reason is in their words
        delivery.status = "invalid"
        delivery.error = str(exc)[:500]
        return False
    except Exception as exc:
        delivery.status = "invalid"
        delivery.error = failure_reason(exc)
        return False
    delivery.event_name = event.name
    if allowed is not None and event.metric_key not in allowed:
        delivery.status = "ignored"
        return False
    delivery.event = event
    return True


async def _finish(session: AsyncSession, deliveries: list[_Delivery]) -> None:
    """Store each delivery's outcome and release its claim: one executemany UPDATE for the
    invalid ones (with their error), one for the others (with their event name)."""
    now = utcnow()
    invalid = [d for d in deliveries if d.status == "invalid"]
    mapped = [d for d in deliveries if d.status != "invalid"]
    where = DELIVERIES.c.id == bindparam("b_id")
    common = {"status": bindparam("b_status"), "processed_at": now, "claimed_until": None}
    if invalid:
        await session.execute(
            update(DELIVERIES).where(where).values(**common, error=bindparam("b_detail")),
            [{"b_id": d.id, "b_status": d.status, "b_detail": d.error} for d in invalid],
        )
    if mapped:
        await session.execute(
            update(DELIVERIES).where(where).values(**common, event_name=bindparam("b_detail")),
            [{"b_id": d.id, "b_status": d.status, "b_detail": d.event_name} for d in mapped],
        )
