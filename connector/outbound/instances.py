"""The instances sending to Customer.io now, so that together they keep to the rate limit.

``sync.rate_limit_per_second`` is a ceiling for all instances together. An instance running a
pass registers in ``sync_instances`` and renews its heartbeat every :data:`HEARTBEAT_SECONDS`
while the pass runs; it paces itself at ``rate / instances whose heartbeat is fresh``
(:func:`~connector.outbound.ratelimit.instance_share`) and follows the count at every
heartbeat, so a long pass slows down when another instance starts sending and speeds up when
one stops. A pass deletes its row when it ends; a dead instance's row goes stale after
:data:`STALE_AFTER_HEARTBEATS` missed heartbeats and its share goes back to the others.

The heartbeat costs two short transactions a second per sending instance, not a database
round trip per request as a shared token bucket would.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.ext.asyncio import async_sessionmaker

from connector.db.models import SyncInstance
from connector.db.types import utcnow
from connector.db.upsert import insert
from connector.outbound.ratelimit import TokenBucket, instance_share

log = logging.getLogger("connector.outbound")

HEARTBEAT_SECONDS = 1.0
"""How often a sending instance renews its heartbeat and recomputes its share."""
STALE_AFTER_HEARTBEATS = 3
"""A heartbeat older than this many periods is a dead instance's: it no longer counts."""


class SendingInstances:
    """This instance's entry in ``sync_instances``, and the count of live entries."""

    def __init__(
        self,
        sessionmaker: async_sessionmaker,
        instance_id: str,
        heartbeat_seconds: float = HEARTBEAT_SECONDS,
    ):
        if heartbeat_seconds <= 0:
            raise ValueError("heartbeat_seconds must be positive")
        self._sessionmaker = sessionmaker
        self.instance_id = instance_id
        self.heartbeat_seconds = heartbeat_seconds
        self.stale_after = timedelta(seconds=heartbeat_seconds * STALE_AFTER_HEARTBEATS)

    async def beat(self) -> int:
        """Renew this instance's heartbeat; return how many instances are sending (at least 1).

        Stale rows are deleted on the way. On PostgreSQL the database's clock stamps and judges
        the heartbeats, so instances on hosts whose clocks differ still agree on what is fresh;
        SQLite's instances all run on one host.
        """
        async with self._sessionmaker() as session:
            postgres = session.bind.dialect.name == "postgresql"
            now: Any = func.now() if postgres else utcnow()
            cutoff = now - self.stale_after
            upsert = insert(session, SyncInstance).values(
                instance_id=self.instance_id, heartbeat_at=now
            )
            upsert = upsert.on_conflict_do_update(
                index_elements=[SyncInstance.instance_id],
                set_={"heartbeat_at": upsert.excluded.heartbeat_at},
            )
            async with session.begin():
                await session.execute(
                    delete(SyncInstance).where(SyncInstance.heartbeat_at < cutoff)
                )
                await session.execute(upsert)
            # Counted after the commit, not in the same transaction: of two instances that
            # register at the same moment, the one committing last is sure to see the other.
            async with session.begin():
                live = await session.scalar(
                    select(func.count())
                    .select_from(SyncInstance)
                    .where(SyncInstance.heartbeat_at >= cutoff)
                )
        return max(1, live or 0)

    async def leave(self) -> None:
        """Delete this instance's row: the others take its share at their next heartbeat."""
        async with self._sessionmaker() as session, session.begin():
            await session.execute(
                delete(SyncInstance).where(SyncInstance.instance_id == self.instance_id)
            )

    @contextlib.asynccontextmanager
    async def sharing(self, bucket: TokenBucket, total_rate: float) -> AsyncIterator[None]:
        """Register, pace ``bucket`` at this instance's share of ``total_rate`` and keep it
        up to date until the block ends; then leave.

        The first heartbeat happens before the block starts, so the first request already
        goes at the share. A failed heartbeat later on is logged and the rate kept; a failed
        leave is logged and the row left to go stale.
        """
        bucket.set_rate(instance_share(total_rate, await self.beat()))
        heartbeat = asyncio.create_task(self._keep_beating(bucket, total_rate))
        try:
            yield
        finally:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat
            try:
                await self.leave()
            except Exception:
                log.warning("could not deregister the sending instance", exc_info=True)

    async def _keep_beating(self, bucket: TokenBucket, total_rate: float) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_seconds)
            try:
                active = await self.beat()
            except Exception:
                log.warning("sync heartbeat failed; keeping the current rate", exc_info=True)
                continue
            share = instance_share(total_rate, active)
            if share != bucket.rate_per_second:
                log.debug(
                    "rate share changed",
                    extra={"instances": active, "rate_per_second": round(share, 3)},
                )
                bucket.set_rate(share)
