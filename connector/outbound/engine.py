"""One outbound pass: claim pending users, plan each one, send, and write the outcome back.

Users are worked on ``sync.concurrency`` at a time; each user's calls go out in order
(identify chunks, then events), and the sender paces all of them with the rate limit. The next
batch is claimed while the last users of the current one are still being sent, and finished
users are written back many to a transaction (:class:`_WriteBack`).

A pass fails per user, never as a whole: a user whose planning or sending raises is
quarantined (``failed``, with the reason) and the others go on. A 429 is sent again after the
sender's pause without counting an attempt; a 5xx or a timeout counts against the operation
that got it only (:meth:`SyncEngine._retry_at`).

The deletion guard (``sync.max_deletions_per_pass``) looks at the pass as a whole: before
sending anything, the pass plans every due user to count the deletions it would make (those
an admin confirmed are not counted). When there are more than the limit, it sends none of
them: each is *held* (:class:`DeletionGuard`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

from connector.config import SyncConfig
from connector.db.sync_state import SyncStatus
from connector.db.types import utcnow
from connector.ops.metrics import Metrics
from connector.outbound.batch_delivery import BatchDelivery, Delivery
from connector.outbound.operations import (
    DeleteCustomer,
    Identify,
    Operation,
    PlanAction,
    Sender,
    SendResult,
    Track,
    UserPlan,
    UserSnapshot,
    operation_name,
)
from connector.outbound.packing import pack
from connector.outbound.planner import plan_user
from connector.outbound.repository import ClaimedUser, OutboundRepository, UserOutcome
from connector.rules.delivery import THROTTLE_RESENDS, SendOutcome, backoff_delay, gives_up
from connector.settings.model import ConnectorSettings

log = logging.getLogger("connector.outbound")

INVALID_CREDENTIALS = "Invalid credentials"
MISSING_CREDENTIALS = "Customer.io site id and API key are not set"

# The write-back commits at most this many users at once, and a finished user waits at most
# this long for others to share its transaction (a pass's last ones are committed at once).
MAX_WRITE_GROUP = 500
MAX_WRITE_DELAY = 0.5
MAX_WRITE_QUEUE = 2 * MAX_WRITE_GROUP
"""Finished users waiting for the write-back at most: beyond, workers wait before taking more
(memory stays flat however many users a pass has, and no lease runs out in the queue)."""
SLICES_IN_FLIGHT = 4
"""With the batch transport, slices of ``claim_batch_size`` users worked on at once: some are
claimed, planned or written back while the others' requests are out (a request's answer takes
its latency plus Customer.io's time for hundreds of operations)."""
ERROR_REASONS_KEPT = 5
"""A pass's run record keeps this many distinct reasons users failed or will be retried."""


UserCount = Literal["sent", "skipped", "deleted", "failed", "retrying", "held"]
"""How a pass counts a user it is through with (a field of :class:`SyncSummary`)."""

_COUNTED_AS: dict[str, UserCount] = {
    SyncStatus.SYNCED: "sent",
    SyncStatus.ANONYMOUS: "sent",
    SyncStatus.SKIPPED: "skipped",
    SyncStatus.DELETED: "deleted",
    SyncStatus.FAILED: "failed",
    SyncStatus.HELD: "held",
}
"""A settled user's count, by the status the pass leaves it."""


def _counted_as(outcome: UserOutcome, will_retry: bool) -> UserCount:
    if outcome.status == "retry":
        return "retrying" if will_retry else "failed"
    return _COUNTED_AS[outcome.status]


@dataclass
class SyncSummary:
    sent: int = 0
    skipped: int = 0
    deleted: int = 0
    failed: int = 0
    retrying: int = 0
    held: int = 0
    """Users whose deletion the deletion guard held back for an operator to confirm."""
    events_sent: int = 0
    api_calls: int = 0
    transport: str = "single"
    batch_requests: int = 0
    batch_users: int = 0
    """The users of each batch request, summed."""
    error: str | None = None
    skip_reasons: dict[str, int] = field(default_factory=dict)
    error_reasons: list[str] = field(default_factory=list)
    """The first :data:`ERROR_REASONS_KEPT` distinct reasons users failed or will be retried."""

    def note_error(self, reason: str) -> None:
        if reason not in self.error_reasons and len(self.error_reasons) < ERROR_REASONS_KEPT:
            self.error_reasons.append(reason)

    def count(self, outcome: UserCount, n: int = 1) -> None:
        """Add ``n`` users counted as ``outcome``."""
        match outcome:
            case "sent":
                self.sent += n
            case "skipped":
                self.skipped += n
            case "deleted":
                self.deleted += n
            case "failed":
                self.failed += n
            case "retrying":
                self.retrying += n
            case "held":
                self.held += n
            case _:
                raise ValueError(f"not a user count: {outcome!r}")

    @property
    def users_per_request(self) -> float | None:
        """Users in a batch request on average; None when the pass sent none."""
        return self.batch_users / self.batch_requests if self.batch_requests else None

    @property
    def users(self) -> int:
        return self.sent + self.skipped + self.deleted + self.failed + self.retrying + self.held

    def as_dict(self) -> dict[str, Any]:
        return {
            "sent": self.sent,
            "skipped": self.skipped,
            "deleted": self.deleted,
            "failed": self.failed,
            "retrying": self.retrying,
            "held": self.held,
            "events_sent": self.events_sent,
            "api_calls": self.api_calls,
            "users_per_request": self.users_per_request,
            "error": self.error,
        }

    def run_counts(self) -> dict[str, int | str]:
        return {
            "transport": self.transport,
            "users_sent": self.sent,
            "users_skipped": self.skipped,
            "users_deleted": self.deleted,
            "users_held": self.held,
            "users_failed": self.failed,
            "users_retrying": self.retrying,
            "events_sent": self.events_sent,
            "api_calls": self.api_calls,
            "batch_requests": self.batch_requests,
            "batch_users": self.batch_users,
        }


def deletion_held_reason(planned: int, limit: int) -> str:
    return (
        f"deletion held: the pass planned {planned} deletions, more than "
        f"sync.max_deletions_per_pass ({limit}); confirm to send them"
    )


@dataclass
class DeletionGuard:
    """Which deletions of one pass may go out (``sync.max_deletions_per_pass``).

    ``planned`` is the number of unconfirmed deletions the pass planned before it began. Over
    ``limit``, every one is held; otherwise they go out, but never more than ``limit`` (users
    that changed since the count could add some). A ``limit`` of 0 holds none.
    """

    limit: int
    planned: int = 0
    admitted: int = 0

    @property
    def holds_all(self) -> bool:
        return 0 < self.limit < self.planned

    @property
    def reason(self) -> str:
        return deletion_held_reason(max(self.planned, self.admitted + 1), self.limit)

    def admit(self, plan: UserPlan, snapshot: UserSnapshot) -> bool:
        """Whether ``plan`` may be carried out; False: its deletion is held."""
        if plan.action is not PlanAction.DELETE or snapshot.deletion_confirmed or not self.limit:
            return True
        if self.holds_all or self.admitted >= self.limit:
            return False
        self.admitted += 1
        return True


def counts_against_guard(plan: UserPlan, snapshot: UserSnapshot) -> bool:
    """A deletion the guard counts: planned, and not confirmed by an admin."""
    return plan.action is PlanAction.DELETE and not snapshot.deletion_confirmed


@dataclass
class CallLog:
    """The Track API calls of a pass so far: how many went through, how many failed (429, 5xx,
    timeouts, connection errors) and the last failure's reason. Updated as answers come in."""

    ok: int = 0
    failed: int = 0
    last_failure: str | None = None

    def record(self, result: SendResult) -> None:
        if result.ok:
            self.ok += 1
        elif result.outcome in (SendOutcome.RETRY, SendOutcome.THROTTLED):
            self.failed += 1
            self.last_failure = result.reason


def _quarantine(outcome: UserOutcome, stage: str, error: Exception) -> UserOutcome:
    """Mark a user that could not be processed as failed, keeping what this pass did for it."""
    outcome.status = SyncStatus.FAILED
    # The type only: an exception's text may carry the user's data.
    outcome.reason = f"could not be processed ({stage} raised {type(error).__name__})"
    return outcome


_STATUS_RANK: dict[str, int] = {SyncStatus.FAILED: 1, "retry": 2, "released": 3}
"""When several operations of a user went wrong (a batch answers them all), the outcome is
the highest: not reached, then retried, then failed."""


def _settle(outcome: UserOutcome, status: SyncStatus | Literal["retry", "released"]) -> bool:
    """Set ``status`` unless the user already has a higher one; whether it was set."""
    if _STATUS_RANK.get(status, 0) <= _STATUS_RANK.get(outcome.status, 0):
        return False
    outcome.status = status
    return True


def record_result(operation: Operation, result: SendResult, outcome: UserOutcome) -> bool:
    """Record what ``result`` means for the user of ``operation``; False where the v1
    transport stops sending that user's operations (the pass stopped, a retry, a failed
    identify or deletion). Both transports record every answer with it."""
    if result.outcome is SendOutcome.UNAUTHORIZED:
        _settle(outcome, "released")
        return False
    if result.outcome in (SendOutcome.RETRY, SendOutcome.THROTTLED):
        if _settle(outcome, "retry"):
            outcome.reason = result.reason
            outcome.throttled = result.outcome is SendOutcome.THROTTLED
            outcome.retry_after = result.retry_after
        elif outcome.status == "retry":
            # Throttled only while every retried operation was; wait for the longest pause.
            outcome.throttled = outcome.throttled and result.outcome is SendOutcome.THROTTLED
            if result.retry_after is not None:
                outcome.retry_after = max(outcome.retry_after or 0.0, result.retry_after)
        return False
    # Settled either way: a later pass does not send this operation again.
    outcome.progressed = True
    if isinstance(operation, Identify):
        if result.ok:
            outcome.identified = True
            outcome.sent_attributes.update(operation.attributes)
            return True
        if _settle(outcome, SyncStatus.FAILED):
            outcome.reason = f"identify failed: {result.reason}"
        return False
    if isinstance(operation, DeleteCustomer):
        if result.ok:
            outcome.deleted = True
            return True
        if _settle(outcome, SyncStatus.FAILED):
            outcome.reason = f"delete failed: {result.reason}"
        return False
    if isinstance(operation, Track):
        outcome.event_results[operation.source_event_id] = (
            ("sent", None) if result.ok else ("failed", result.reason)
        )
    return True


class UnauthorizedError(Exception):
    """Customer.io refused the credentials; the pass stopped."""


def attributes_hash(attributes: dict[str, Any]) -> str:
    encoded = json.dumps(attributes, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(encoded.encode()).hexdigest()


_INITIAL_STATUS = {
    PlanAction.SEND: SyncStatus.SYNCED,
    PlanAction.ANONYMOUS: SyncStatus.ANONYMOUS,
    PlanAction.DELETE: SyncStatus.DELETED,
    PlanAction.SKIP: SyncStatus.SKIPPED,
}

ProgressCallback = Callable[[UserPlan, UserOutcome], None]


def _initial_outcome(plan: UserPlan) -> UserOutcome:
    """What a user's outcome is before any call: the plan's verdicts on attributes and events."""
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
        calls: CallLog | None = None,
    ) -> SyncSummary:
        """Work off every due pending user; stops early (and says so) on a 401.

        Returns once every outcome of the pass is committed: the summary counts only what
        the database holds. ``calls`` is kept up to date with every Track API answer.
        """
        summary = SyncSummary(transport=self._config.transport)
        calls = CallLog() if calls is None else calls
        stop = asyncio.Event()
        due_by = utcnow()
        names = await self._repository.segment_names(settings.synchronized_segments)
        guard = await self._guard(settings, names, due_by)
        batched = self._config.transport == "batch"
        feed = _ClaimFeed(
            self._repository,
            self._config.claim_batch_size,
            due_by=due_by,
            # Sliced, the next claim starts while a whole slice is still to be handed out.
            low_water=self._config.claim_batch_size if batched else self._config.concurrency,
            stop=stop,
        )

        def written(group: list[_Done]) -> None:
            for done in group:
                self._count(done.plan, done.outcome, done.retry_at is not None, summary)
                if progress is not None:
                    progress(done.plan, done.outcome)

        writer = _WriteBack(self._repository, written)
        untouched: list[str] = []

        async def worker() -> None:
            while not (stop.is_set() or writer.failed):
                await writer.room()
                claimed = await feed.next()
                if claimed is None:
                    return
                if stop.is_set() or writer.failed:
                    untouched.append(claimed.snapshot.id)
                    return
                plan, outcome = await self._work(
                    claimed, settings, names, guard, sender, stop, calls
                )
                writer.put(_Done(claimed, plan, outcome, self._retry_at(claimed, outcome)))

        delivery = BatchDelivery(
            sender,
            max_bytes=self._config.batch_max_bytes,
            max_operations=self._config.batch_max_operations,
            stop=stop,
            metrics=self._metrics,
            record=calls.record,
        )

        async def slice_worker() -> None:
            while not (stop.is_set() or writer.failed):
                await writer.room()
                users = await feed.take(self._config.claim_batch_size)
                if not users:
                    return
                if stop.is_set() or writer.failed:
                    untouched.extend(claimed.snapshot.id for claimed in users)
                    return
                finished, sent = await self._work_slice(users, settings, names, guard, delivery)
                summary.api_calls += sent.requests
                summary.batch_requests += sent.batch_requests
                summary.batch_users += sent.batch_users
                for done in finished:
                    writer.put(done)

        if batched:
            workers = [asyncio.create_task(slice_worker()) for _ in range(SLICES_IN_FLIGHT)]
        else:
            workers = [asyncio.create_task(worker()) for _ in range(self._config.concurrency)]
        try:
            await asyncio.gather(*workers)
        except BaseException:
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            raise
        finally:
            # Users claimed but never reached go back untouched; every outcome is committed
            # (or the write-back's error raised) before the pass returns.
            untouched.extend(claimed.snapshot.id for claimed in await feed.close())
            await writer.close()
            await self._repository.release(untouched)
        if writer.error is not None:
            raise writer.error
        if stop.is_set():
            summary.error = INVALID_CREDENTIALS
        return summary

    @property
    def transport(self) -> str:
        return self._config.transport

    def count_requests(self, plans: Sequence[UserPlan]) -> int:
        """Track API requests these plans take on the configured transport (without resends):
        batch requests of slices of ``claim_batch_size`` users plus v1 calls, or one call per
        operation with ``single``."""
        sending = [plan for plan in plans if plan.operations]
        if self._config.transport != "batch":
            return sum(len(plan.operations) for plan in sending)
        size = self._config.claim_batch_size
        requests = 0
        for start in range(0, len(sending), size):
            packing = pack(
                [(plan.user_id, plan.operations) for plan in sending[start : start + size]],
                max_bytes=self._config.batch_max_bytes,
                max_operations=self._config.batch_max_operations,
            )
            requests += len(packing.requests) + len(packing.v1)
        return requests

    async def _guard(
        self, settings: ConnectorSettings, names: frozenset[str], due_by: datetime
    ) -> DeletionGuard:
        """The pass's deletion guard, with the deletions planned for the users due by
        ``due_by`` counted (only when deletion and the guard are on)."""
        guard = DeletionGuard(self._config.max_deletions_per_pass)
        if not (settings.enable_user_deletion and guard.limit):
            return guard
        offset = 0
        while batch := await self._repository.peek(
            self._config.claim_batch_size, offset, due_by=due_by
        ):
            offset += len(batch)
            for claimed in batch:
                with contextlib.suppress(Exception):  # the pass quarantines it, not the guard
                    plan = plan_user(claimed.snapshot, settings, whitelisted_names=names)
                    guard.planned += counts_against_guard(plan, claimed.snapshot)
        if guard.holds_all:
            log.warning(
                "deletions held",
                extra={"planned": guard.planned, "max_deletions_per_pass": guard.limit},
            )
        return guard

    async def _work(
        self,
        claimed: ClaimedUser,
        settings: ConnectorSettings,
        names: frozenset[str],
        guard: DeletionGuard,
        sender: Sender,
        stop: asyncio.Event,
        calls: CallLog,
    ) -> tuple[UserPlan, UserOutcome]:
        """Plan and send one user; whatever it raises stays with that user."""
        plan, outcome, send = self._prepare(claimed, settings, names, guard)
        if not send:
            return plan, outcome
        try:
            await self._execute(plan, sender, stop, outcome, calls)
        except Exception as exc:
            log.error(
                "user quarantined",
                extra={
                    "user_id": claimed.snapshot.id,
                    "stage": "sending",
                    "error": type(exc).__name__,
                },
            )
            _quarantine(outcome, "sending", exc)
        return plan, outcome

    def _prepare(
        self,
        claimed: ClaimedUser,
        settings: ConnectorSettings,
        names: frozenset[str],
        guard: DeletionGuard,
    ) -> tuple[UserPlan, UserOutcome, bool]:
        """A user's plan and initial outcome, and whether it has operations to send."""
        user_id = claimed.snapshot.id
        try:
            plan = plan_user(claimed.snapshot, settings, whitelisted_names=names)
        except Exception as exc:
            log.error(
                "user quarantined",
                extra={"user_id": user_id, "stage": "planning", "error": type(exc).__name__},
            )
            outcome = _quarantine(UserOutcome(status=SyncStatus.FAILED), "planning", exc)
            return UserPlan(user_id=user_id, action=PlanAction.SKIP), outcome, False
        if not guard.admit(plan, claimed.snapshot):
            # Its pending events wait with it: sent if it comes back, skipped once deleted.
            held = UserOutcome(SyncStatus.HELD, customer_id=plan.customer_id, reason=guard.reason)
            return plan, held, False
        outcome = _initial_outcome(plan)
        return plan, outcome, plan.action is not PlanAction.SKIP and bool(plan.operations)

    async def _work_slice(
        self,
        users: list[ClaimedUser],
        settings: ConnectorSettings,
        names: frozenset[str],
        guard: DeletionGuard,
        delivery: BatchDelivery,
    ) -> tuple[list[_Done], Delivery]:
        """Plan a slice of users and send all their operations in batch requests."""
        prepared = [(claimed, *self._prepare(claimed, settings, names, guard)) for claimed in users]
        sending = [(plan.user_id, plan.operations) for _, plan, _, send in prepared if send]
        try:
            sent = await delivery.deliver(sending)
        except Exception as exc:
            log.error(
                "users quarantined",
                extra={"users": len(sending), "stage": "sending", "error": type(exc).__name__},
            )
            for _, _, outcome, send in prepared:
                if send:
                    _quarantine(outcome, "sending", exc)
            sent = Delivery()
        finished = []
        for claimed, plan, outcome, send in prepared:
            if send and outcome.status != SyncStatus.FAILED:
                self._fold(plan, outcome, sent)
            finished.append(_Done(claimed, plan, outcome, self._retry_at(claimed, outcome)))
        return finished, sent

    @staticmethod
    def _fold(plan: UserPlan, outcome: UserOutcome, sent: Delivery) -> None:
        """Record on ``outcome`` every answer a batch delivery got for the user of ``plan``."""
        user_id = plan.user_id
        if user_id in sent.unpackable:
            log.error(
                "user quarantined",
                extra={"user_id": user_id, "stage": "packing", "error": sent.unpackable[user_id]},
            )
            outcome.status = SyncStatus.FAILED
            outcome.reason = f"could not be processed (packing raised {sent.unpackable[user_id]})"
            return
        for operation, result in sent.results.get(user_id, ()):
            record_result(operation, result, outcome)
        outcome.attribute_errors.update(sent.left_out.get(user_id, {}))
        if plan.action is PlanAction.SEND and outcome.status == SyncStatus.SYNCED:
            outcome.full_hash = attributes_hash(plan.attributes)

    async def _send(
        self, operation: Operation, sender: Sender, outcome: UserOutcome, calls: CallLog
    ) -> SendResult:
        """One operation; after a 429 (the sender has paused) it goes again, a few times."""
        for _ in range(THROTTLE_RESENDS + 1):
            result = await sender.send(operation)
            outcome.api_calls += 1
            calls.record(result)
            self._metrics.api_calls.labels(operation_name(operation), str(result.status or 0)).inc()
            if result.outcome is not SendOutcome.THROTTLED:
                break
        return result

    async def _execute(
        self,
        plan: UserPlan,
        sender: Sender,
        stop: asyncio.Event,
        outcome: UserOutcome,
        calls: CallLog,
    ) -> None:
        """Send the plan's operations in order (v1), recording each result on ``outcome``."""
        if plan.action is PlanAction.SKIP:
            return
        for operation in plan.operations:
            if stop.is_set():
                outcome.status = "released"
                return
            result = await self._send(operation, sender, outcome, calls)
            if result.outcome is SendOutcome.UNAUTHORIZED:
                stop.set()
            if not record_result(operation, result, outcome):
                return
        if plan.action is PlanAction.SEND:
            outcome.full_hash = attributes_hash(plan.attributes)

    def _retry_at(self, claimed: ClaimedUser, outcome: UserOutcome) -> datetime | None:
        """When a ``retry`` outcome may be tried again; None when it gives up (or is no retry).

        Attempts are those of the operation the user is held up at: they start again when
        this pass settled any operation (the failing one is then a later one), and a 429 is
        none. Only a user whose same operation failed ``max_attempts`` times gives up.
        """
        if outcome.status != "retry":
            return None
        before = 0 if outcome.progressed else claimed.attempts
        if outcome.throttled:
            outcome.attempts = before
            delay = outcome.retry_after or self._config.backoff_base_seconds
            return utcnow() + timedelta(seconds=delay)
        attempts = outcome.attempts = before + 1
        if gives_up(attempts, self._config.max_attempts):
            outcome.reason = f"gave up after {attempts} attempts: {outcome.reason}"
            return None
        delay = backoff_delay(
            attempts, self._config.backoff_base_seconds, self._config.backoff_max_seconds
        )
        return utcnow() + timedelta(seconds=delay)

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
        key = _counted_as(outcome, will_retry)
        summary.count(key)
        if status == SyncStatus.SKIPPED and outcome.reason:
            summary.skip_reasons[outcome.reason] = summary.skip_reasons.get(outcome.reason, 0) + 1
        elif key in ("failed", "retrying") and outcome.reason:
            summary.note_error(outcome.reason)
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


@dataclass(eq=False)
class _Done:
    """A user the pass is through with, waiting for the write-back."""

    claimed: ClaimedUser
    plan: UserPlan
    outcome: UserOutcome
    retry_at: datetime | None


class _ClaimFeed:
    """The claimed users of one pass, handed to its workers one at a time.

    When no more than ``low_water`` are left, the next batch is claimed in the background, so
    the workers never wait for a claim while the last users of a batch are being sent. Every
    claim takes only users due by ``due_by`` (when the pass started); none is made once
    ``stop`` is set.
    """

    def __init__(
        self,
        repository: OutboundRepository,
        batch_size: int,
        *,
        due_by: datetime,
        low_water: int,
        stop: asyncio.Event,
    ):
        self._repository = repository
        self._batch_size = batch_size
        self._due_by = due_by
        self._low_water = low_water
        self._stop = stop
        self._users: deque[ClaimedUser] = deque()
        self._claiming: asyncio.Task[None] | None = None
        self._exhausted = False
        self._error: BaseException | None = None

    async def next(self) -> ClaimedUser | None:
        """The next claimed user; None when nothing due is left (or the pass stopped)."""
        while True:
            if self._error is not None:
                raise self._error
            if (
                self._claiming is None
                and not self._exhausted
                and not self._stop.is_set()
                and len(self._users) <= self._low_water
            ):
                self._claiming = asyncio.create_task(self._claim(), name="outbound-claim")
            if self._users:
                return self._users.popleft()
            if self._claiming is None:
                return None
            # Shielded: a worker cancelled while waiting must not cancel the claim.
            await asyncio.shield(self._claiming)

    async def take(self, limit: int) -> list[ClaimedUser]:
        """Up to ``limit`` claimed users at once; empty when nothing due is left."""
        first = await self.next()
        if first is None:
            return []
        users = [first]
        while self._users and len(users) < limit:
            users.append(self._users.popleft())
        return users

    async def _claim(self) -> None:
        try:
            batch = await self._repository.claim(self._batch_size, due_by=self._due_by)
        except Exception as exc:
            self._error = exc
            return
        finally:
            self._claiming = None
        if not batch:
            self._exhausted = True
        self._users.extend(batch)

    async def close(self) -> list[ClaimedUser]:
        """Stop claiming; the users claimed and not handed out (a claim under way included)."""
        self._exhausted = True
        if self._claiming is not None:
            await asyncio.shield(self._claiming)
        users = list(self._users)
        self._users.clear()
        return users


class _WriteBack:
    """Writes the users a pass is through with, many to a transaction (a group commit).

    A group is what has queued by the time the previous commit ends, topped up for at most
    ``MAX_WRITE_DELAY`` seconds (or until ``MAX_WRITE_GROUP`` are waiting): at the pace of the
    rate limit a few users finish per commit, and each transaction carries a fixed cost.
    ``written`` is called with each group once it is committed. The first error stops the
    writer and is kept in ``error``.
    """

    def __init__(
        self,
        repository: OutboundRepository,
        written: Callable[[list[_Done]], None],
    ):
        self._repository = repository
        self._written = written
        self._queue: list[_Done] = []
        self._queued = asyncio.Event()
        self._full = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._closing = False
        self.error: BaseException | None = None
        self._task = asyncio.create_task(self._run(), name="outbound-write-back")

    @property
    def failed(self) -> bool:
        return self.error is not None

    def put(self, done: _Done) -> None:
        self._queue.append(done)
        self._queued.set()
        if len(self._queue) >= MAX_WRITE_GROUP:
            self._full.set()
        if len(self._queue) >= MAX_WRITE_QUEUE:
            self._room.clear()

    async def room(self) -> None:
        """Wait while :data:`MAX_WRITE_QUEUE` users are queued (not once the writer stopped)."""
        while not self._room.is_set() and self._task is not None and not self._task.done():
            waiter = asyncio.ensure_future(self._room.wait())
            await asyncio.wait({waiter, self._task}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()

    async def close(self) -> None:
        """Commit everything queued, then stop."""
        self._closing = True
        self._full.set()
        self._queued.set()
        await self._task

    async def _run(self) -> None:
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._queued.clear()
                await self._queued.wait()
                continue
            if not self._full.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._full.wait(), MAX_WRITE_DELAY)
            group = self._queue[:MAX_WRITE_GROUP]
            del self._queue[:MAX_WRITE_GROUP]
            if len(self._queue) < MAX_WRITE_GROUP and not self._closing:
                self._full.clear()
            if len(self._queue) < MAX_WRITE_QUEUE:
                self._room.set()
            try:
                await self._repository.finish_many(
                    [(done.claimed, done.outcome, done.retry_at) for done in group]
                )
                self._written(group)
            except Exception as exc:
                self.error = exc
                return
