"""APScheduler jobs of one instance. Every job takes its work from the database, so several
instances may run the same jobs side by side."""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timedelta

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from connector.config import SyncConfig
from connector.outbound.service import SyncService

log = logging.getLogger("connector.scheduler")

SYNC_JOB_ID = "outbound-sync"
# Notifications usually come in bursts; a short delay lets one pass take the whole burst.
TRIGGER_DELAY_SECONDS = 0.2


class Scheduler:
    def __init__(self, sync_service: SyncService, sync_config: SyncConfig):
        self._sync = sync_service
        self._config = sync_config
        self._scheduler = AsyncIOScheduler()
        self._rerun = False
        self._job: asyncio.Task | None = None
        self._stopping = False

    def start(self) -> None:
        if not self._config.scheduled:
            return
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
        self._scheduler.start()

    async def shutdown(self) -> None:
        self._stopping = True
        if self._scheduler.running:
            self._scheduler.shutdown(wait=False)
        # A job just handed to the event loop gets to start (and return at once); a pass
        # that is under way finishes writing its outcomes.
        await asyncio.sleep(0)
        if self._job is not None and not self._job.done():
            await asyncio.shield(self._job)

    def trigger_sync(self) -> None:
        """Ask for a pass within about a second, besides the schedule."""
        if not self._scheduler.running:
            return
        if self._sync.running:
            self._rerun = True
            return
        job = self._scheduler.get_job(SYNC_JOB_ID)
        if job is not None:
            soon = datetime.now().astimezone() + timedelta(seconds=TRIGGER_DELAY_SECONDS)
            if job.next_run_time is None or job.next_run_time > soon:
                job.modify(next_run_time=soon)

    async def _sync_job(self) -> None:
        self._job = asyncio.current_task()
        while not self._stopping:
            self._rerun = False
            try:
                await self._sync.run_once("schedule")
            except Exception:
                log.exception("outbound sync pass failed")
                return
            if not self._rerun:
                return
