"""Prometheus metrics of one service instance, on a registry of its own (no global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST


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

    def webhook_outcome(self, outcome: str, event_label: str = "", count: int = 1) -> None:
        """Count ``count`` webhooks with ``outcome``. ``event_label`` must come from a bounded
        set (:func:`connector.inbound.mapping.webhook_event_label`): every distinct value is a
        time series kept in memory until the process ends."""
        self.webhooks.labels(outcome, event_label).inc(count)

    def render(self) -> bytes:
        return generate_latest(self.registry)
