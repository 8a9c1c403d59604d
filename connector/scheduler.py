"""APScheduler jobs of one instance. Every job takes its work from the database, so several
instances may run the same jobs side by side."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from sqlalchemy.ext.asyncio import async_sessionmaker

from connector.config import Config
from connector.forwarding.outbox import ForwardingService
from connector.inbound.processor import InboundProcessor
from connector.inbound.retention import purge_deliveries
from connector.ops import quarantine
from connector.outbound.engine import SyncSummary
from connector.outbound.service import SyncService

log = logging.getLogger("connector.scheduler")

SYNC_JOB_ID = "outbound-sync"
# The processor wakes up for each stored webhook; the sweep only catches what was left behind
# (a restart, another instance's expired claim).
INBOUND_SWEEP_SECONDS = 15
RETENTION_PURGE_SECONDS = 3600
# Forwarded events reach the destination within this, without coupling the processor to it.
FORWARD_FLUSH_SECONDS = 2
# Credentials revoked in Customer.io show on /status within half an hour, even with no traffic.
CREDENTIAL_CHECK_SECONDS = 30 * 60
# Notifications usually come in bursts; a short delay lets one pass take the whole burst.
TRIGGER_DELAY_SECONDS = 0.2


class Scheduler:
    def __init__(
        self,
        sync_service: SyncService,
        processor: InboundProcessor,
        sessionmaker: async_sessionmaker,
        config: Config,
        *,
        credential_check: Callable[[], Awaitable[object]] | None = None,
        forwarding: ForwardingService | None = None,
    ):
        self._sync = sync_service
        self._forwarding = forwarding
        self._credential_check = credential_check
        self._processor = processor
        self._sessionmaker = sessionmaker
        self._config = config.sync
        self._retention_days = config.inbound.retention_days
        self._scheduler = AsyncIOScheduler()
        self._rerun = False
        self._asked: str | None = None
        self._job: asyncio.Task | None = None
        self._manual: asyncio.Task | None = None
        self._stopping = False
        self._running: set[asyncio.Task] = set()

    def start(self) -> None:
        self._scheduler.add_job(
            self._processor.wake, "interval", seconds=INBOUND_SWEEP_SECONDS, id="inbound-sweep"
        )
        self._every(RETENTION_PURGE_SECONDS, "retention-purge", self._purge)
        if self._credential_check is not None:
            self._every(CREDENTIAL_CHECK_SECONDS, "credential-check", self._credential_check)
        if self._forwarding is not None:
            self._every(FORWARD_FLUSH_SECONDS, "forward-flush", self._forwarding.flush)
        if self._config.scheduled:
            self._add_sync_job()
        self._scheduler.start()

    def _add_sync_job(self) -> None:
        self._scheduler.add_job(
            self._sync_job,
            "interval",
            seconds=self._config.interval_seconds,
            id=SYNC_JOB_ID,
            max_instances=1,
            coalesce=True,
            misfire_grace_time=None,
            next_run_time=datetime.now().astimezone(),
        )

    async def shutdown(self) -> None:
        self._stopping = True
        if self._scheduler.running:
            self._scheduler.shutdown(wait=False)
        # A job just handed to the event loop gets to start (and return at once); a pass
        # that is under way finishes writing its outcomes.
        await asyncio.sleep(0)
        if self._job is not None and not self._job.done():
            await asyncio.shield(self._job)
        # Background jobs under way finish before the database they use is closed.
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)

    def _every(self, seconds: float, job_id: str, work: Callable[[], Awaitable[object]]) -> None:
        """A background job: one run at a time, failures logged and tried again next time."""

        async def run() -> None:
            if self._stopping:
                return
            task = asyncio.current_task()
            assert task is not None
            self._running.add(task)
            try:
                await work()
            except Exception:
                log.exception("scheduled job failed", extra={"job": job_id})
            finally:
                self._running.discard(task)

        self._scheduler.add_job(
            run, "interval", seconds=seconds, id=job_id, max_instances=1, coalesce=True
        )

    async def _purge(self) -> None:
        purged = await purge_deliveries(self._sessionmaker, self._retention_days)
        if purged:
            log.info("purged old webhook deliveries", extra={"deliveries": purged})

    def trigger_sync(self, trigger: str) -> None:
        """Ask for a pass within about a second, besides the schedule; the pass is recorded
        with ``trigger`` (see :meth:`_ask`)."""
        if not self._scheduler.running or not self._config.scheduled:
            return
        self._ask(trigger)
        if self._sync.running:
            self._rerun = True
            return
        job = self._scheduler.get_job(SYNC_JOB_ID)
        if job is not None:
            soon = datetime.now().astimezone() + timedelta(seconds=TRIGGER_DELAY_SECONDS)
            if job.next_run_time is None or job.next_run_time > soon:
                job.modify(next_run_time=soon)

    async def request_pass(
        self, trigger: str, *, full: bool = False, wait: bool = False
    ) -> SyncSummary | None:
        """ "Sync now", from the admin API, the settings page or a retry: the one way to ask
        for a pass, even when ``sync.scheduled`` is off.

        With ``wait``, the pass runs here and its summary is returned (after the one under way,
        if any: the sync service runs one pass at a time). Otherwise it starts within about a
        second (on the schedule's job when the sync is scheduled, as a task of its own when
        not), after the one under way.
        """
        if wait:
            return await self._sync.run_once(trigger, full=full)
        if self._config.scheduled and self._scheduler.running:
            self.trigger_sync(trigger)
        elif self._sync.running:
            self._ask(trigger)
            self._rerun = True
        elif not self._stopping:
            self._manual = asyncio.create_task(self._sync_job(trigger), name="sync-on-request")
        return None

    async def retry_failed(self, trigger: str) -> dict[str, int]:
        """What the pipelines set aside becomes pending again (see :mod:`connector.ops.quarantine`),
        and the jobs that take it start now, the pass recorded with the caller's ``trigger``
        (``api``, ``page``); returns how many of each kind."""
        retried = await quarantine.retry_failed(self._sessionmaker)
        if retried["users"]:
            await self.request_pass(trigger)
        if retried["webhooks"]:
            self._processor.wake()
        return retried

    def _ask(self, trigger: str) -> None:
        """Remember who asked for the next pass: someone's request (``api``, ``page``) is kept
        over a notification's, and the first of either until that pass starts."""
        if self._asked is None or self._asked == "notification":
            self._asked = trigger

    def _take_asked(self) -> str:
        """Who the pass starting now is for: whoever asked, else the schedule."""
        trigger, self._asked = self._asked or "schedule", None
        return trigger

    async def _sync_job(self, trigger: str | None = None) -> None:
        self._job = asyncio.current_task()
        while not self._stopping:
            self._rerun = False
            if trigger is None:
                trigger = self._take_asked()
            try:
                await self._sync.run_once(trigger)
            except Exception:
                log.exception("outbound sync pass failed")
                return
            if not self._rerun:
                return
            trigger = None
