"""Delivering the forwarding outbox to the Segment-compatible destination (SPEC §7).

Tracked events wait in ``forward_outbox`` as Segment-spec ``track`` calls. A flush claims the
due ones (conditional updates, ``FOR UPDATE SKIP LOCKED`` on PostgreSQL, each claim a lease),
posts them as ``{"batch": [...]}`` with the write key as the Basic-auth user name, and writes
the outcome back: ``sent``, set back for a retry with backoff (429, 5xx, no answer), or
``failed`` (any other answer, or too many attempts). Several instances flushing one database
split the work and never send a message twice.

Neither the write key nor the payloads are ever logged or stored in an error: a reason is the
HTTP status and a short, sanitised excerpt of the destination's answer.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import re
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

import aiohttp
from sqlalchemy import and_, bindparam, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from connector.config import SyncConfig
from connector.db.claims import claim_rows, unclaimed
from connector.db.models import ForwardMessage
from connector.db.types import utcnow
from connector.forwarding.message import segment_track
from connector.ops.metrics import Metrics
from connector.rules.delivery import SendOutcome, backoff_delay, classify_status, gives_up
from connector.rules.failures import failure_reason
from connector.settings.model import ConnectorSettings
from connector.settings.store import SettingsStore

log = logging.getLogger("connector.forwarding")

# Segment's batch endpoint takes up to 500 KB per request and 32 KB per call, and answers 400
# to the whole batch when either is exceeded. 100 calls keep a batch of ordinary events far
# below that; the byte cap (with headroom for the envelope) covers events with big properties.
BATCH_SIZE = 100
MAX_BATCH_BYTES = 450_000
MAX_MESSAGE_BYTES = 32 * 1024
# A batch request either lands within seconds or the destination is in trouble: retry later.
REQUEST_TIMEOUT_SECONDS = 10.0
QUEUE = "forward_outbox"
MAX_REASON_CHARS = 200
# Error answers are short; never read a large echo of the batch to build a reason.
_MAX_ANSWER_BYTES = 4096
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]+")
_REDACTED = "[redacted]"
# A refused write key is retried this much later: often enough to notice a corrected key soon,
# rarely enough not to flood the destination's logs with refused batches.
UNAUTHORIZED_RETRY_SECONDS = 60


ForwardOutcome = Literal["sent", "retrying", "failed"]
"""What a flush did with a message (a field of :class:`FlushSummary`)."""


@dataclass
class FlushSummary:
    """What one flush did, counted in messages (``batches`` counts requests)."""

    sent: int = 0
    retrying: int = 0
    failed: int = 0
    batches: int = 0
    error: str | None = None
    """The last reason a message was not sent in this flush."""

    def count(self, outcome: ForwardOutcome, n: int = 1) -> None:
        """Add ``n`` messages that ended ``outcome``."""
        match outcome:
            case "sent":
                self.sent += n
            case "retrying":
                self.retrying += n
            case "failed":
                self.failed += n
            case _:
                raise ValueError(f"not a forwarding outcome: {outcome!r}")

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ClaimedMessage:
    id: int
    attempts: int
    encoded: bytes
    """The call as compact JSON, exactly as it goes into the batch."""
    lease: datetime
    """The ``claimed_until`` this claim set: results are written only while it holds."""


@dataclass(frozen=True)
class BatchResult:
    outcome: SendOutcome
    status: int | None
    """The HTTP status, ``None`` when no answer came."""
    reason: str | None = None


def encode_message(payload: dict[str, Any]) -> bytes:
    """The call as compact UTF-8 JSON; ``ValueError`` for what JSON or UTF-8 cannot carry
    (NaN, lone surrogates)."""
    return json.dumps(payload, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode(
        "utf-8"
    )


def batch_body(encoded: Iterable[bytes], sent_at: datetime) -> bytes:
    """The request body: ``{"batch": [...], "sentAt": ...}`` built from already encoded calls."""
    stamp = sent_at.isoformat().replace("+00:00", "Z")
    return b'{"batch":[' + b",".join(encoded) + b'],"sentAt":' + json.dumps(stamp).encode() + b"}"


def pack_batches(
    messages: list[ClaimedMessage],
    max_count: int = BATCH_SIZE,
    max_bytes: int = MAX_BATCH_BYTES,
) -> list[list[ClaimedMessage]]:
    """Split messages, in order, into batches of at most ``max_count`` calls and
    ``max_bytes`` of encoded calls (separators included)."""
    batches: list[list[ClaimedMessage]] = []
    current: list[ClaimedMessage] = []
    size = 0
    for message in messages:
        added = len(message.encoded) + (1 if current else 0)
        if current and (len(current) >= max_count or size + added > max_bytes):
            batches.append(current)
            current, size, added = [], 0, len(message.encoded)
        current.append(message)
        size += added
    if current:
        batches.append(current)
    return batches


def basic_token(write_key: str) -> str:
    """The Basic-auth credentials: the write key as user name, an empty password."""
    return base64.b64encode(f"{write_key}:".encode()).decode("ascii")


def answer_excerpt(answer: bytes, write_key: str) -> str:
    """A short, single-line excerpt of the destination's answer, without the write key."""
    text = answer.decode("utf-8", errors="replace")
    if write_key:
        text = text.replace(basic_token(write_key), _REDACTED).replace(write_key, _REDACTED)
    text = _CONTROL_CHARS.sub(" ", text).strip()
    if len(text) > MAX_REASON_CHARS:
        return text[: MAX_REASON_CHARS - 1] + "…"
    return text


class SegmentClient:
    """Posts batches to a Segment-compatible endpoint over one shared ``aiohttp`` session."""

    def __init__(self, timeout_seconds: float = REQUEST_TIMEOUT_SECONDS):
        self._timeout = aiohttp.ClientTimeout(total=timeout_seconds)
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        return self._session

    async def send_batch(self, url: str, write_key: str, body: bytes) -> BatchResult:
        """Post one batch; 2xx is OK, 429/5xx and no answer RETRY, 401/403 UNAUTHORIZED,
        anything else FAIL."""
        headers = {"Content-Type": "application/json"}
        if write_key:
            headers["Authorization"] = f"Basic {basic_token(write_key)}"
        try:
            async with self._client().post(
                url,
                data=body,
                headers=headers,
                # A redirect would carry the write key elsewhere; report it instead.
                allow_redirects=False,
            ) as response:
                status = response.status
                outcome = classify_status(status)
                if outcome is SendOutcome.OK:
                    return BatchResult(outcome, status)
                excerpt = answer_excerpt(await response.content.read(_MAX_ANSWER_BYTES), write_key)
        except TimeoutError:
            return BatchResult(SendOutcome.RETRY, None, "timeout")
        except aiohttp.ClientError as exc:
            return BatchResult(SendOutcome.RETRY, None, f"connection error ({type(exc).__name__})")
        if status == 403:
            # Segment-spec destinations answer a write key they do not know with 401 or 403.
            outcome = SendOutcome.UNAUTHORIZED
        reason = f"HTTP {status}: {excerpt}" if excerpt else f"HTTP {status}"
        return BatchResult(outcome, status, reason)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _claimable(now: datetime, due_by: datetime) -> Any:
    return and_(
        ForwardMessage.status == "pending",
        ForwardMessage.next_attempt_at <= due_by,
        unclaimed(ForwardMessage.claimed_until, now),
    )


_outbox = ForwardMessage.__table__
# One statement for every outcome, executed once per message of a batch (executemany), and
# only while the claim still holds: a message whose lease ran out belongs to its new claimant.
_WRITE_RESULT = (
    update(_outbox)
    .where(
        _outbox.c.id == bindparam("message_id"),
        _outbox.c.status == "pending",
        _outbox.c.claimed_until == bindparam("lease"),
    )
    .values(
        status=bindparam("new_status"),
        attempts=bindparam("new_attempts"),
        next_attempt_at=bindparam("retry_at"),
        last_error=bindparam("reason"),
        sent_at=bindparam("sent"),
        claimed_until=None,
    )
)


@dataclass(frozen=True)
class ForwardedEvent:
    """A tracked event to forward, as :func:`enqueue` takes it."""

    tracked_event_id: int
    event_id: str
    name: str
    properties: dict[str, Any]
    occurred_at: datetime
    customer_id: str | None
    email: str | None


async def enqueue(session: AsyncSession, events: list[ForwardedEvent], prefix: str) -> None:
    """Add ``events`` to the outbox as Segment-spec ``track`` calls, due now, in the caller's
    transaction (the one that stores the tracked events: both or neither)."""
    if not events:
        return
    now = utcnow()
    await session.execute(
        _outbox.insert(),
        [
            {
                "tracked_event_id": event.tracked_event_id,
                "payload": segment_track(
                    event_id=event.event_id,
                    name=event.name,
                    properties=event.properties,
                    occurred_at=event.occurred_at,
                    customer_id=event.customer_id,
                    email=event.email,
                    prefix=prefix,
                ),
                "status": "pending",
                "attempts": 0,
                "next_attempt_at": now,
                "created_at": now,
            }
            for event in events
        ],
    )


class ForwardOutbox:
    """The ``forward_outbox`` table as a work queue: claims with leases, and results."""

    def __init__(self, sessionmaker: async_sessionmaker, lease_seconds: float):
        self._sessionmaker = sessionmaker
        self._lease = timedelta(seconds=lease_seconds)

    async def claim(self, limit: int, due_by: datetime) -> list[ClaimedMessage]:
        """Lease up to ``limit`` pending messages due by ``due_by``, oldest due first.

        A message that cannot be encoded (stored before the processor cleaned what it wrote)
        is marked ``failed`` with the reason instead: it would fail every batch it joined.
        """
        now = utcnow()
        lease = now + self._lease
        async with self._sessionmaker() as session, session.begin():
            rows = await claim_rows(
                session,
                ForwardMessage,
                claimable=_claimable(now, due_by),
                order_by=(ForwardMessage.next_attempt_at, ForwardMessage.id),
                limit=limit,
                values={"claimed_until": lease},
                returning=(ForwardMessage.id, ForwardMessage.attempts, ForwardMessage.payload),
            )
            claimed: list[ClaimedMessage] = []
            unsendable: list[dict[str, Any]] = []
            for id_, attempts, payload in rows:
                try:
                    encoded = encode_message(payload)
                except (TypeError, ValueError) as exc:
                    unsendable.append(
                        {
                            "message_id": id_,
                            "lease": lease,
                            "new_status": "failed",
                            "new_attempts": attempts,
                            "retry_at": now,
                            "reason": failure_reason(exc),
                            "sent": None,
                        }
                    )
                    continue
                claimed.append(
                    ClaimedMessage(id=id_, attempts=attempts, encoded=encoded, lease=lease)
                )
            if unsendable:
                await session.execute(_WRITE_RESULT, unsendable)
                log.warning(
                    "forward messages quarantined",
                    extra={
                        "operation": "forward",
                        "messages": [u["message_id"] for u in unsendable],
                    },
                )
        return sorted(claimed, key=lambda message: message.id)

    async def release(self, messages: list[ClaimedMessage]) -> None:
        """Give claimed messages back untouched (the flush stopped before sending them)."""
        if not messages:
            return
        async with self._sessionmaker() as session, session.begin():
            for lease, ids in _by_lease(messages).items():
                await session.execute(
                    update(ForwardMessage)
                    .where(ForwardMessage.id.in_(ids), ForwardMessage.claimed_until == lease)
                    .values(claimed_until=None)
                )

    async def write_results(self, results: list[dict[str, Any]]) -> None:
        """Store outcomes: dicts with the bind parameters of :data:`_WRITE_RESULT`."""
        if results:
            async with self._sessionmaker() as session, session.begin():
                await session.execute(_WRITE_RESULT, results)

    async def count_pending(self) -> int:
        async with self._sessionmaker() as session:
            query = select(func.count()).where(ForwardMessage.status == "pending")
            return await session.scalar(query) or 0


def _by_lease(messages: list[ClaimedMessage]) -> dict[datetime, list[int]]:
    grouped: dict[datetime, list[int]] = {}
    for message in messages:
        grouped.setdefault(message.lease, []).append(message.id)
    return grouped


class ForwardingService:
    """Flushes the outbox to ``forward_url``; one instance per process, closed on shutdown."""

    def __init__(
        self,
        sessionmaker: async_sessionmaker,
        settings: SettingsStore,
        sync_config: SyncConfig,
        metrics: Metrics,
        instance_id: str,
    ):
        self._settings = settings
        self._config = sync_config
        self._metrics = metrics
        self.instance_id = instance_id
        self.outbox = ForwardOutbox(sessionmaker, sync_config.lease_seconds)
        self.client = SegmentClient()

    async def flush(self) -> FlushSummary:
        """Send every message due when the flush starts; without ``forward_url``, nothing.

        Messages set back for a retry wait for a later flush. When the destination asks for
        a retry (429, 5xx, no answer) or refuses the write key (401, 403) the flush stops
        there, and the remaining messages stay pending, their attempts untouched.
        """
        summary = FlushSummary()
        settings = await self._settings.load()
        if settings.forward_url:
            started = utcnow()
            while await self._flush_claim(settings, started, summary):
                pass
        self._metrics.queue_depth.labels(QUEUE).set(await self.outbox.count_pending())
        return summary

    async def _flush_claim(
        self, settings: ConnectorSettings, started: datetime, summary: FlushSummary
    ) -> bool:
        """Claim and send one claim's worth of messages; False once the flush should stop."""
        claimed = await self.outbox.claim(BATCH_SIZE, due_by=started)
        if not claimed:
            return False
        oversized = [m for m in claimed if len(m.encoded) > MAX_MESSAGE_BYTES]
        if oversized:
            reason = f"message larger than the {MAX_MESSAGE_BYTES // 1024} KB a call may have"
            await self._finish(oversized, BatchResult(SendOutcome.FAIL, None, reason), summary)
        batches = deque(pack_batches([m for m in claimed if len(m.encoded) <= MAX_MESSAGE_BYTES]))
        while batches:
            batch = batches.popleft()
            body = batch_body((m.encoded for m in batch), utcnow())
            result = await self.client.send_batch(
                settings.forward_url, settings.forward_write_key, body
            )
            summary.batches += 1
            self._metrics.forward_requests.labels(str(result.status or 0)).inc()
            if result.outcome is SendOutcome.FAIL and len(batch) > 1:
                # The destination refused the batch as a whole (one bad call makes Segment
                # answer 400 to all of them): its halves go again, until the call it refuses
                # is alone and fails by itself.
                middle = len(batch) // 2
                batches.extendleft([batch[middle:], batch[:middle]])
                continue
            await self._finish(batch, result, summary)
            if result.outcome in (SendOutcome.RETRY, SendOutcome.UNAUTHORIZED):
                await self.outbox.release([m for later in batches for m in later])
                return False
        return True

    async def _finish(
        self, batch: list[ClaimedMessage], result: BatchResult, summary: FlushSummary
    ) -> None:
        now = utcnow()
        results: list[dict[str, Any]] = []
        counts: dict[ForwardOutcome, int] = {"sent": 0, "retrying": 0, "failed": 0}
        for message in batch:
            attempts = message.attempts + 1
            status, retry_at, reason = "failed", now, result.reason
            if result.outcome is SendOutcome.OK:
                status = "sent"
            elif result.outcome is SendOutcome.UNAUTHORIZED:
                # The write key is wrong: nothing is lost, and nothing is tried again until a
                # later flush, when the key may have been corrected; the reason shows on /status.
                status, attempts = "pending", message.attempts
                retry_at = now + timedelta(seconds=UNAUTHORIZED_RETRY_SECONDS)
            elif result.outcome is SendOutcome.RETRY:
                if gives_up(attempts, self._config.max_attempts):
                    reason = f"gave up after {attempts} attempts: {result.reason}"
                else:
                    status = "pending"
                    delay = backoff_delay(
                        attempts,
                        self._config.backoff_base_seconds,
                        self._config.backoff_max_seconds,
                    )
                    retry_at = now + timedelta(seconds=delay)
            counts["retrying" if status == "pending" else status] += 1
            results.append(
                {
                    "message_id": message.id,
                    "lease": message.lease,
                    "new_status": status,
                    "new_attempts": attempts,
                    "retry_at": retry_at,
                    "reason": reason,
                    "sent": now if status == "sent" else None,
                }
            )
        await self.outbox.write_results(results)
        for outcome, count in counts.items():
            summary.count(outcome, count)
            if count:
                self._metrics.forwarded.labels(outcome).inc(count)
        if result.reason:
            summary.error = result.reason
        log.info(
            "forward batch",
            extra={
                "operation": "forward",
                "instance": self.instance_id,
                "messages": len(batch),
                "status": result.status,
                "reason": result.reason,
                **counts,
            },
        )

    async def close(self) -> None:
        await self.client.close()
