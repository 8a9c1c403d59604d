"""What the outbound engine works with: user snapshots in, planned Track API operations out.

The planner turns a :class:`UserSnapshot` into a :class:`UserPlan` (pure, no I/O); a
:class:`Sender` carries out each :data:`Operation` and answers with a :class:`SendResult`.
Nothing here knows about HTTP, the database or the ``customerio`` package.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from connector.notifications.parse import PlatformEvent
from connector.rules.delivery import SendOutcome


@dataclass(frozen=True)
class UserSnapshot:
    """A pending user as the planner sees it: what the platform sent and what Customer.io holds."""

    id: str
    external_id: str | None
    email: str | None
    anonymous_ids: tuple[str, ...]
    attributes: dict[str, Any]
    """Everything of the platform's ``user`` object, ``traits_`` prefixes already removed."""
    account: dict[str, Any]
    segments: tuple[dict[str, Any], ...]
    """``{"id": ..., "name": ...}`` of every segment the user is in."""
    via_batch: bool = False
    full: bool = False
    """Send every attribute, not only what changed since the last identify."""
    sent_attributes: dict[str, Any] = field(default_factory=dict)
    """Attributes of the last successful identify calls, by Customer.io name."""
    cio_id: str | None = None
    cio_created_at: datetime | None = None
    cio_deleted_at: datetime | None = None
    events: tuple[PlatformEvent, ...] = ()
    deletion_confirmed: bool = False
    """An admin confirmed the deletion a pass held: the deletion guard does not count it."""


@dataclass(frozen=True)
class Identify:
    """``PUT /api/v1/customers/{customer_id}`` with up to ``max_attributes_per_call`` attributes."""

    customer_id: str
    attributes: dict[str, Any]


@dataclass(frozen=True)
class Track:
    """An event or page view for a customer, or for an anonymous id when ``customer_id`` is None.

    Customer: ``POST /api/v1/customers/{customer_id}/events``; anonymous:
    ``POST /api/v1/events`` with ``anonymous_id``. ``page`` sends ``type: "page"``.
    """

    name: str
    data: dict[str, Any]
    timestamp: int | None
    id: str
    """Deterministic ULID derived from the platform's event id: Customer.io deduplicates on it."""
    source_event_id: str
    """The platform's ``event_id``, to record the outcome on the right stored event."""
    customer_id: str | None = None
    anonymous_id: str | None = None
    page: bool = False


@dataclass(frozen=True)
class DeleteCustomer:
    """``DELETE /api/v1/customers/{customer_id}``."""

    customer_id: str


Operation = Identify | Track | DeleteCustomer


def operation_name(operation: Operation) -> str:
    """The operation's label in metrics: identify, delete, page, track or track_anonymous."""
    if isinstance(operation, Identify):
        return "identify"
    if isinstance(operation, DeleteCustomer):
        return "delete"
    if operation.page:
        return "page"
    return "track_anonymous" if operation.customer_id is None else "track"


class PlanAction(enum.StrEnum):
    SEND = "send"
    """Identify (when anything changed) and/or events for a customer."""
    ANONYMOUS = "anonymous"
    """Only anonymous events: the user has no customer id."""
    DELETE = "delete"
    SKIP = "skip"


@dataclass(frozen=True)
class UserPlan:
    """Everything one user needs this pass, in the order it must happen."""

    user_id: str
    action: PlanAction
    customer_id: str | None = None
    operations: tuple[Operation, ...] = ()
    skip_reason: str | None = None
    attributes: dict[str, Any] = field(default_factory=dict)
    """The full mapped attribute set (not just the changed part), for the write-back."""
    attribute_errors: dict[str, str] = field(default_factory=dict)
    """Attributes left out, by name, with the reason."""
    skipped_events: dict[str, str] = field(default_factory=dict)
    """Pending events not sent, by platform ``event_id``, with the reason."""


@dataclass(frozen=True)
class SendResult:
    outcome: SendOutcome
    status: int | None = None
    reason: str | None = None
    """Short and safe to store and log: never the request payload."""
    retry_after: float | None = None
    """``THROTTLED``: seconds the sender pauses before its next request (Retry-After, or its
    own backoff)."""

    @property
    def ok(self) -> bool:
        return self.outcome is SendOutcome.OK


@dataclass(frozen=True)
class BatchResult:
    """The answer to one ``/api/v2/batch`` request."""

    result: SendResult
    """The request's: ``OK`` for any 2xx (a 207 too)."""
    refused: dict[int, str] = field(default_factory=dict)
    """With a 207: the index of each operation Customer.io refused, and its reason."""


class Sender(Protocol):
    """Carries out operations against the Track API: one v1 call, or a v2 batch request."""

    async def send(self, operation: Operation) -> SendResult: ...

    async def send_batch(self, operations: list[dict[str, Any]]) -> BatchResult: ...

    async def close(self) -> None: ...
