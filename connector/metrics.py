"""Prometheus metrics of one service instance, on a registry of its own (no global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from connector.inbound.mapping import OBJECT_NAMES, event_name

CONTENT_TYPE = CONTENT_TYPE_LATEST

KNOWN_METRICS = (
    "drafted",
    "attempted",
    "sent",
    "delivered",
    "opened",
    "clicked",
    "converted",
    "bounced",
    "dropped",
    "deferred",
    "spammed",
    "failed",
    "undeliverable",
    "subscribed",
    "unsubscribed",
    "cio_subscription_preferences_changed",
)
"""The metrics of Customer.io's reporting webhooks, over all channels."""

KNOWN_EVENT_NAMES = frozenset(
    event_name(object_type, metric) for object_type in OBJECT_NAMES for metric in KNOWN_METRICS
)
"""The ``event`` label values of ``connector_webhooks``: each known object type with each
known metric.

Webhook payloads are written by whoever holds the URL; every distinct label value is a time
series kept in memory until the process ends, so anything else is counted as
:data:`OTHER_EVENT`."""

OTHER_EVENT = "other"


def webhook_event_label(name: str) -> str:
    """``name`` if it is a known event name (or ``""``: no event), else ``"other"``."""
    return name if not name or name in KNOWN_EVENT_NAMES else OTHER_EVENT


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.users = Counter(
            "connector_outbound_users",
            "Users handled by the outbound sync, by outcome",
            ["outcome"],
            registry=self.registry,
        )
        self.events_sent = Counter(
            "connector_outbound_events_sent",
            "Events and page views sent to Customer.io",
            registry=self.registry,
        )
        self.api_calls = Counter(
            "connector_customerio_api_calls",
            "Track API calls, by operation and HTTP status (0 when no answer came)",
            ["operation", "status"],
            registry=self.registry,
        )
        self.notifications = Counter(
            "connector_notifications",
            "Platform notifications received, by route and outcome",
            ["route", "outcome"],
            registry=self.registry,
        )
        self.webhooks = Counter(
            "connector_webhooks",
            "Customer.io webhooks received, by outcome and event name",
            ["outcome", "event"],
            registry=self.registry,
        )
        self.forwarded = Counter(
            "connector_forwarded_messages",
            "Tracked events handed to the forwarding destination, by outcome",
            ["outcome"],
            registry=self.registry,
        )
        self.forward_requests = Counter(
            "connector_forward_requests",
            "Batch requests to the forwarding destination, by HTTP status (0 when no answer came)",
            ["status"],
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "connector_queue_depth",
            "Work waiting in the database, by queue",
            ["queue"],
            registry=self.registry,
        )

    def webhook_outcome(self, outcome: str, name: str = "", count: int = 1) -> None:
        """Count ``count`` webhooks with ``outcome``, their event ``name`` bounded."""
        self.webhooks.labels(outcome, webhook_event_label(name)).inc(count)

    def render(self) -> bytes:
        return generate_latest(self.registry)
