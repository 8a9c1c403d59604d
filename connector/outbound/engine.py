"""One outbound pass: claim pending users, plan each one, send, and write the outcome back.

Users are worked on ``sync.concurrency`` at a time; each user's calls go out in order
(identify chunks, then events), and the sender paces all of them with the rate limit.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from connector.config import SyncConfig
from connector.db.types import utcnow
from connector.metrics import Metrics
from connector.outbound.operations import (
    DeleteCustomer,
    Identify,
    Operation,
    PlanAction,
    Sender,
    SendOutcome,
    Track,
    UserPlan,
)
from connector.outbound.planner import plan_user
from connector.outbound.repository import ClaimedUser, OutboundRepository, UserOutcome
from connector.outbound.retry import backoff_delay, gives_up
from connector.settings import ConnectorSettings

log = logging.getLogger("connector.outbound")

INVALID_CREDENTIALS = "Invalid credentials"
MISSING_CREDENTIALS = "Customer.io site id and API key are not set"


@dataclass
class SyncSummary:
    sent: int = 0
    skipped: int = 0
    deleted: int = 0
    failed: int = 0
    retrying: int = 0
    events_sent: int = 0
    api_calls: int = 0
    error: str | None = None
    skip_reasons: dict[str, int] = field(default_factory=dict)

    @property
    def users(self) -> int:
        return self.sent + self.skipped + self.deleted + self.failed + self.retrying

    def as_dict(self) -> dict[str, Any]:
        return {
            "sent": self.sent,
            "skipped": self.skipped,
            "deleted": self.deleted,
            "failed": self.failed,
            "retrying": self.retrying,
            "events_sent": self.events_sent,
            "api_calls": self.api_calls,
            "error": self.error,
        }

    def run_counts(self) -> dict[str, int]:
        return {
            "users_sent": self.sent,
            "users_skipped": self.skipped,
            "users_deleted": self.deleted,
            "users_failed": self.failed,
            "users_retrying": self.retrying,
            "events_sent": self.events_sent,
            "api_calls": self.api_calls,
        }


class UnauthorizedError(Exception):
    """Customer.io refused the credentials; the pass stopped."""


def attributes_hash(attributes: dict[str, Any]) -> str:
    encoded = json.dumps(attributes, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(encoded.encode()).hexdigest()


def _operation_name(operation: Operation) -> str:
    if isinstance(operation, Identify):
        return "identify"
    if isinstance(operation, DeleteCustomer):
        return "delete"
    if operation.page:
        return "page"
    return "track_anonymous" if operation.customer_id is None else "track"


_INITIAL_STATUS = {
    PlanAction.SEND: "synced",
    PlanAction.ANONYMOUS: "anonymous",
    PlanAction.DELETE: "deleted",
    PlanAction.SKIP: "skipped",
}

ProgressCallback = Callable[[UserPlan, UserOutcome], None]


class SyncEngine:
    def __init__(
        self,
        repository: OutboundRepository,
        config: SyncConfig,
        metrics: Metrics,
    ):
        self._repository = repository
        self._config = config
        self._metrics = metrics

    async def run(
        self,
        settings: ConnectorSettings,
        sender: Sender,
        *,
        progress: ProgressCallback | None = None,
    ) -> SyncSummary:
        """Work off every due pending user; stops early (and says so) on a 401."""
        summary = SyncSummary()
        stop = asyncio.Event()
        started = utcnow()
        while not stop.is_set():
            batch = await self._repository.claim(self._config.claim_batch_size, due_by=started)
            if not batch:
                break
            await self._run_batch(batch, settings, sender, summary, stop, progress)
        if stop.is_set():
            summary.error = INVALID_CREDENTIALS
        return summary

    async def _run_batch(
        self,
        batch: list[ClaimedUser],
        settings: ConnectorSettings,
        sender: Sender,
        summary: SyncSummary,
        stop: asyncio.Event,
        progress: ProgressCallback | None,
    ) -> None:
        queue: asyncio.Queue[ClaimedUser] = asyncio.Queue()
        for claimed in batch:
            queue.put_nowait(claimed)
        untouched: list[str] = []

        async def worker() -> None:
            while not queue.empty():
                claimed = queue.get_nowait()
                if stop.is_set():
                    untouched.append(claimed.snapshot.id)
                    continue
                plan = plan_user(claimed.snapshot, settings)
                outcome = await self._execute(plan, sender, stop)
                await self._finish(claimed, plan, outcome, summary)
                if progress is not None:
                    progress(plan, outcome)

        workers = min(self._config.concurrency, len(batch))
        await asyncio.gather(*(worker() for _ in range(workers)))
        await self._repository.release(untouched)

    async def _execute(self, plan: UserPlan, sender: Sender, stop: asyncio.Event) -> UserOutcome:
        outcome = UserOutcome(
            status=_INITIAL_STATUS[plan.action],
            customer_id=plan.customer_id,
            attribute_errors=dict(plan.attribute_errors),
            event_results={
                event_id: ("skipped", reason) for event_id, reason in plan.skipped_events.items()
            },
        )
        if plan.action is PlanAction.SKIP:
            outcome.reason = plan.skip_reason
            return outcome
        for operation in plan.operations:
            if stop.is_set():
                outcome.status = "released"
                return outcome
            result = await sender.send(operation)
            outcome.api_calls += 1
            self._metrics.api_calls.labels(
                _operation_name(operation), str(result.status or 0)
            ).inc()
            if result.outcome is SendOutcome.UNAUTHORIZED:
                stop.set()
                outcome.status = "released"
                return outcome
            if result.outcome is SendOutcome.RETRY:
                outcome.status = "retry"
                outcome.reason = result.reason
                return outcome
            if isinstance(operation, Identify):
                if result.ok:
                    outcome.identified = True
                    outcome.sent_attributes.update(operation.attributes)
                else:
                    outcome.status = "failed"
                    outcome.reason = f"identify failed: {result.reason}"
                    return outcome
            elif isinstance(operation, DeleteCustomer):
                if result.ok:
                    outcome.deleted = True
                else:
                    outcome.status = "failed"
                    outcome.reason = f"delete failed: {result.reason}"
                    return outcome
            elif isinstance(operation, Track):
                outcome.event_results[operation.source_event_id] = (
                    ("sent", None) if result.ok else ("failed", result.reason)
                )
        if plan.action is PlanAction.SEND:
            outcome.full_hash = attributes_hash(plan.attributes)
        return outcome

    async def _finish(
        self,
        claimed: ClaimedUser,
        plan: UserPlan,
        outcome: UserOutcome,
        summary: SyncSummary,
    ) -> None:
        retry_at = None
        if outcome.status == "retry":
            attempts = claimed.attempts + 1
            if gives_up(attempts, self._config.max_attempts):
                outcome.reason = f"gave up after {attempts} attempts: {outcome.reason}"
            else:
                delay = backoff_delay(
                    attempts, self._config.backoff_base_seconds, self._config.backoff_max_seconds
                )
                retry_at = utcnow() + timedelta(seconds=delay)
        await self._repository.finish(claimed, outcome, retry_at)
        self._count(plan, outcome, retry_at is not None, summary)

    def _count(
        self, plan: UserPlan, outcome: UserOutcome, will_retry: bool, summary: SyncSummary
    ) -> None:
        summary.api_calls += outcome.api_calls
        events_sent = sum(1 for status, _ in outcome.event_results.values() if status == "sent")
        summary.events_sent += events_sent
        self._metrics.events_sent.inc(events_sent)
        status = outcome.status
        if status == "released":
            return
        if status == "retry":
            key = "retrying" if will_retry else "failed"
        elif status in ("synced", "anonymous"):
            key = "sent"
        elif status == "deleted":
            key = "deleted"
        else:
            key = status
        setattr(summary, key, getattr(summary, key) + 1)
        if status == "skipped" and outcome.reason:
            summary.skip_reasons[outcome.reason] = summary.skip_reasons.get(outcome.reason, 0) + 1
        self._metrics.users.labels(key).inc()
        log.info(
            "user handled",
            extra={
                "operation": plan.action.value,
                "user_id": plan.user_id,
                "outcome": key,
                "reason": outcome.reason,
                "events_sent": events_sent,
            },
        )
