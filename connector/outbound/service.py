"""The outbound sync as the rest of the service uses it: one pass at a time per instance,
with its run recorded, its share of the rate limit kept up to date, and the credential status
and failing Track API calls recorded for ``/status`` (the latter while the pass runs)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from connector.ops.metrics import Metrics
from connector.ops.status import CredentialStatusStore
from connector.outbound.engine import (
    INVALID_CREDENTIALS,
    MISSING_CREDENTIALS,
    CallLog,
    ProgressCallback,
    SyncEngine,
    SyncSummary,
    counts_against_guard,
)
from connector.outbound.instances import SendingInstances
from connector.outbound.operations import (
    DeleteCustomer,
    Identify,
    PlanAction,
    Sender,
    Track,
    UserPlan,
)
from connector.outbound.planner import plan_user
from connector.outbound.ratelimit import TokenBucket
from connector.outbound.repository import OutboundRepository
from connector.settings.model import ConnectorSettings
from connector.settings.store import SettingsStore

log = logging.getLogger("connector.outbound")

SenderFactory = Callable[[ConnectorSettings, TokenBucket], Sender]
"""Builds a pass's sender, which paces its requests with the given bucket."""

CREDENTIALS_ERRORS = (INVALID_CREDENTIALS, MISSING_CREDENTIALS)
"""The pass errors after which the sync is not "successful" (the alerting metric's rule)."""

CALL_REPORT_SECONDS = 5.0
"""How often a pass under way stores its failing calls, so /status shows them during a long one."""


PREVIEW_PAGE = 500


@dataclass
class Preview:
    """What a pass would do now (``sync --dry-run``): the first plans, and counts of all."""

    plans: list[UserPlan] = field(default_factory=list)
    """The first ``limit`` users' plans."""
    users: int = 0
    identify: int = 0
    events: int = 0
    delete: int = 0
    skip: int = 0
    anonymous: int = 0
    held: int = 0
    """Deletions the deletion guard would hold (all the unconfirmed ones, when over the
    limit); ``delete`` counts the planned deletions, held or not."""
    requests: int = 0
    """Track API requests the pass would make on ``sync.transport`` (without resends)."""
    transport: str = "single"


class SyncService:
    def __init__(
        self,
        repository: OutboundRepository,
        engine: SyncEngine,
        settings: SettingsStore,
        credentials: CredentialStatusStore,
        sender_factory: SenderFactory,
        instances: SendingInstances,
        rate_limit_per_second: float,
        metrics: Metrics | None = None,
    ):
        self.repository = repository
        self.instances = instances
        self._engine = engine
        self._settings = settings
        self._credentials = credentials
        self._sender_factory = sender_factory
        self._rate_limit = rate_limit_per_second
        self._metrics = metrics or Metrics()
        self._lock = asyncio.Lock()

    @property
    def running(self) -> bool:
        return self._lock.locked()

    async def run_once(
        self,
        trigger: str,
        *,
        full: bool = False,
        progress: ProgressCallback | None = None,
        on_start: Callable[[int], None] | None = None,
    ) -> SyncSummary:
        """One complete pass; ``on_start`` learns how many users are due before it begins."""
        async with self._lock:
            settings = await self._settings.load()
            run_id = await self.repository.start_run(trigger, full, dry_run=False)
            if not settings.has_credentials:
                summary = SyncSummary(error=MISSING_CREDENTIALS)
                await self.repository.finish_run(run_id, summary.run_counts(), summary.error)
                return summary
            if full:
                await self.repository.mark_all_pending(full=True)
            if on_start is not None:
                on_start(await self.repository.count_claimable())
            # Paced at this instance's share of the rate limit, kept up to date while it runs.
            bucket = TokenBucket(self._rate_limit)
            sender = self._sender_factory(settings, bucket)
            calls = CallLog()
            try:
                async with (
                    self.instances.sharing(bucket, self._rate_limit),
                    self._reporting(calls),
                ):
                    summary = await self._engine.run(
                        settings, sender, progress=progress, calls=calls
                    )
            finally:
                await sender.close()
            if summary.error == INVALID_CREDENTIALS:
                await self._credentials.record("invalid", "Customer.io answered 401")
                log.error("sync stopped: Customer.io refused the credentials")
            elif calls.ok:
                await self._credentials.record("valid")
            await self.repository.finish_run(
                run_id, summary.run_counts(), summary.error, summary.error_reasons
            )
            self._metrics.pass_finished(time.time(), summary.error in CREDENTIALS_ERRORS)
            level = logging.INFO if summary.users or summary.error else logging.DEBUG
            log.log(level, "sync finished", extra={"trigger": trigger, **summary.as_dict()})
            return summary

    @contextlib.asynccontextmanager
    async def _reporting(self, calls: CallLog) -> AsyncIterator[None]:
        """Store the pass's failing calls every few seconds while it runs, and once at the end;
        a pass whose calls all went through clears the record."""
        reported = 0

        async def report() -> None:
            nonlocal reported
            if calls.failed > reported:
                reported = calls.failed
                await self._credentials.record_call_failures(calls.failed, calls.last_failure)

        async def every_few_seconds() -> None:
            while True:
                await asyncio.sleep(CALL_REPORT_SECONDS)
                try:
                    await report()
                except Exception:
                    log.exception("could not record failing calls")

        task = asyncio.create_task(every_few_seconds(), name="outbound-call-report")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await report()
        if calls.ok and not calls.failed:
            await self._credentials.clear_call_failures()

    async def last_success_at(self) -> float | None:
        """When the latest pass without a credentials error finished, whichever process ran
        it (Unix time)."""
        finished = await self.repository.last_pass_finished_at(CREDENTIALS_ERRORS)
        return finished.timestamp() if finished is not None else None

    async def preview(
        self, *, full: bool = False, limit: int | None = None, max_deletions: int = 0
    ) -> Preview:
        """What a pass would do now (``full``: after ``sync --full``), without sending or
        changing anything: every pending user is planned, the first ``limit`` plans kept.
        ``max_deletions`` is the deletion guard's limit (0: none)."""
        settings = await self._settings.load()
        names = await self.repository.segment_names(settings.synchronized_segments)
        preview = Preview(transport=self._engine.transport)
        guarded = 0
        offset = 0
        while batch := await self.repository.peek(PREVIEW_PAGE, offset, full=full):
            offset += len(batch)
            page: list[UserPlan] = []
            for item in batch:
                plan = plan_user(item.snapshot, settings, whitelisted_names=names)
                page.append(plan)
                preview.users += 1
                if limit is None or len(preview.plans) < limit:
                    preview.plans.append(plan)
                guarded += counts_against_guard(plan, item.snapshot)
                for operation in plan.operations:
                    preview.identify += isinstance(operation, Identify)
                    preview.events += isinstance(operation, Track)
                    preview.delete += isinstance(operation, DeleteCustomer)
                preview.skip += plan.action is PlanAction.SKIP
                preview.anonymous += plan.action is PlanAction.ANONYMOUS
            preview.requests += self._engine.count_requests(page)
        if settings.enable_user_deletion and 0 < max_deletions < guarded:
            preview.held = guarded
        return preview
