"""Tables of the connector. Changing a table means adding an Alembic migration in
connector/migrations/versions/."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    Boolean,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    func,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from connector.db.types import BigIntId, JSONType, UTCDateTime, utcnow


class Base(DeclarativeBase):
    pass


class KeyValue(Base):
    """Small documents: connector settings, generated secrets, credential status."""

    __tablename__ = "key_values"

    key: Mapped[str] = mapped_column(String(100), primary_key=True)
    value: Mapped[Any] = mapped_column(JSONType)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class User(Base):
    """A platform user as last received, and its sync state with Customer.io."""

    __tablename__ = "users"

    id: Mapped[str] = mapped_column(String(255), primary_key=True)
    external_id: Mapped[str | None] = mapped_column(String(255), index=True)
    email: Mapped[str | None] = mapped_column(String(320), index=True)
    anonymous_ids: Mapped[list[str]] = mapped_column(JSONType, default=list)
    attributes: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    account: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    segments: Mapped[list[dict[str, Any]]] = mapped_column(JSONType, default=list)
    indexed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    data_hash: Mapped[str | None] = mapped_column(String(64))
    via_batch: Mapped[bool] = mapped_column(Boolean, default=False)

    # Work queue: a changed user is pending until a sync pass has dealt with it.
    version: Mapped[int] = mapped_column(Integer, default=0)
    pending: Mapped[bool] = mapped_column(Boolean, default=False)
    pending_since: Mapped[datetime | None] = mapped_column(UTCDateTime)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    claimed_by: Mapped[str | None] = mapped_column(String(100))
    claimed_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    full_sync: Mapped[bool] = mapped_column(Boolean, default=False)

    # Outcome of the last pass, and what Customer.io holds. The status is a SyncStatus, changed
    # only by connector.db.sync_state (which imports this module, hence the bare default).
    sync_status: Mapped[str] = mapped_column(String(20), default="new")
    skip_reason: Mapped[str | None] = mapped_column(Text)
    last_error: Mapped[str | None] = mapped_column(Text)
    attribute_errors: Mapped[dict[str, str]] = mapped_column(JSONType, default=dict)
    cio_id: Mapped[str | None] = mapped_column(String(255), index=True)
    cio_created_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    cio_synced_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    cio_deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    cio_hash: Mapped[str | None] = mapped_column(String(64))
    cio_ref: Mapped[str | None] = mapped_column(String(255), index=True)
    """Customer.io's own ``cio_id`` of the person, learnt from reporting webhooks."""
    sent_attributes: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)

    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)

    __table_args__ = (
        Index("ix_users_pending_next", "pending", "next_attempt_at"),
        # The claim's order: walked in order instead of sorting every pending user per claim.
        Index("ix_users_claim_order", "pending", "pending_since", "id"),
        # Webhook users are few: storing a notification finds those it takes over by status
        # (PostgreSQL scanned every user for them).
        Index("ix_users_sync_status", "sync_status"),
    )


# Inbound webhooks find users by email case-insensitively (connector.users.identity).
Index("ix_users_email_lower", func.lower(User.email))


class UserEvent(Base):
    """An event the platform sent for a user, and what became of it on the way out."""

    __tablename__ = "user_events"

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    event_id: Mapped[str] = mapped_column(String(255))
    name: Mapped[str] = mapped_column(String(255))
    properties: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    context: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    occurred_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    status: Mapped[str] = mapped_column(String(20), default="pending")
    reason: Mapped[str | None] = mapped_column(Text)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    __table_args__ = (
        UniqueConstraint("user_id", "event_id", name="uq_user_events_user_event"),
        Index("ix_user_events_user_status", "user_id", "status"),
    )


class SyncRun(Base):
    """One outbound pass of one instance, with its counts; the newest
    :data:`connector.outbound.repository.RUNS_KEPT` are kept."""

    __tablename__ = "sync_runs"

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    instance: Mapped[str] = mapped_column(String(100))
    trigger: Mapped[str] = mapped_column(String(20))
    full: Mapped[bool] = mapped_column(Boolean, default=False)
    dry_run: Mapped[bool] = mapped_column(Boolean, default=False)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    users_sent: Mapped[int] = mapped_column(Integer, default=0)
    users_skipped: Mapped[int] = mapped_column(Integer, default=0)
    users_deleted: Mapped[int] = mapped_column(Integer, default=0)
    users_held: Mapped[int] = mapped_column(Integer, default=0)
    """Deletions the pass planned but held back for an operator to confirm."""
    users_failed: Mapped[int] = mapped_column(Integer, default=0)
    users_retrying: Mapped[int] = mapped_column(Integer, default=0)
    events_sent: Mapped[int] = mapped_column(Integer, default=0)
    api_calls: Mapped[int] = mapped_column(Integer, default=0)
    """Track API requests of the pass."""
    transport: Mapped[str] = mapped_column(String(10), default="single")
    """``sync.transport`` of the pass: ``batch`` or ``single``."""
    batch_requests: Mapped[int] = mapped_column(Integer, default=0)
    batch_users: Mapped[int] = mapped_column(Integer, default=0)
    """The users of each ``/api/v2/batch`` request of the pass, summed: over
    ``batch_requests``, the users per request."""
    error: Mapped[str | None] = mapped_column(Text)
    error_reasons: Mapped[list[str]] = mapped_column(JSONType, default=list)
    """The first few distinct reasons users failed or will be retried
    (:data:`connector.outbound.engine.ERROR_REASONS_KEPT`)."""


class AuditEntry(Base):
    """Something an operator did (or tried): see :mod:`connector.ops.audit`."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    action: Mapped[str] = mapped_column(String(50))
    detail: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    source: Mapped[str] = mapped_column(String(100))
    """The client's address, or ``cli``."""


class WebhookDelivery(Base):
    """A Customer.io reporting webhook as it arrived: the inbox, deduplicated by event id."""

    __tablename__ = "webhook_deliveries"

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    event_id: Mapped[str] = mapped_column(String(255), unique=True)
    body: Mapped[str] = mapped_column(Text)
    headers: Mapped[dict[str, str]] = mapped_column(JSONType, default=dict)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    status: Mapped[str] = mapped_column(String(20), default="pending")
    """``pending``, ``processed``, ``ignored`` (filtered by ``incoming_metrics``), ``unmatched``
    (no identity) or ``invalid`` (could not be read)."""
    event_name: Mapped[str | None] = mapped_column(String(255))
    error: Mapped[str | None] = mapped_column(Text)
    processed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    claimed_until: Mapped[datetime | None] = mapped_column(UTCDateTime)

    __table_args__ = (
        Index("ix_webhook_deliveries_status", "status", "id"),
        Index("ix_webhook_deliveries_received", "received_at"),
    )


class TrackedEvent(Base):
    """An event Customer.io reported (email opened, push delivered, ...) on the user it concerns."""

    __tablename__ = "tracked_events"

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    event_id: Mapped[str] = mapped_column(String(255), unique=True)
    user_id: Mapped[str | None] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), index=True
    )
    name: Mapped[str] = mapped_column(String(255), index=True)
    object_type: Mapped[str] = mapped_column(String(50))
    metric: Mapped[str] = mapped_column(String(100))
    properties: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    context: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    occurred_at: Mapped[datetime] = mapped_column(UTCDateTime)
    customer_id: Mapped[str | None] = mapped_column(String(255))
    email: Mapped[str | None] = mapped_column(String(320))
    cio_id: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ForwardMessage(Base):
    """A Segment-spec call waiting for (or done with) the forwarding destination: the outbox."""

    __tablename__ = "forward_outbox"

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    tracked_event_id: Mapped[int] = mapped_column(
        ForeignKey("tracked_events.id", ondelete="CASCADE"), unique=True
    )
    payload: Mapped[dict[str, Any]] = mapped_column(JSONType)
    status: Mapped[str] = mapped_column(String(20), default="pending")
    """``pending``, ``sent`` or ``failed``."""
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    claimed_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_error: Mapped[str | None] = mapped_column(Text)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    __table_args__ = (Index("ix_forward_outbox_due", "status", "next_attempt_at"),)


class CatalogEntry(Base):
    """A segment, attribute name or event name the platform sent: the settings page's pickers."""

    __tablename__ = "catalog_entries"

    kind: Mapped[str] = mapped_column(String(20), primary_key=True)
    """``segment``, ``attribute`` or ``event``."""
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    label: Mapped[str | None] = mapped_column(String(255))
    """A segment's name."""
    last_seen_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class SyncInstance(Base):
    """An instance running an outbound pass; the rate limit is shared among the live ones.

    Written when a pass starts and at every heartbeat during it, deleted when it ends. A row
    whose heartbeat is stale belongs to a dead instance: it no longer counts, and the next
    heartbeat of any instance deletes it.
    """

    __tablename__ = "sync_instances"

    instance_id: Mapped[str] = mapped_column(String(100), primary_key=True)
    heartbeat_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
