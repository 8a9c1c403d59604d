"""Prometheus metrics of one service instance, on a registry of its own (no global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST

# Track API answers take tens of milliseconds; the client's timeout is 10 s by default.
REQUEST_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# A webhook is processed within a second when all is well; an hour means processing stopped.
LAG_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0)
STATUS_LEVELS = {"ok": 0, "warning": 1, "error": 2}
# What the webhook receiver itself counts (the processor counts the rest, by event name).
RECEIVED_OUTCOMES = (
    "stored",
    "duplicate",
    "unauthorized",
    "too_large",
    "bad_signature",
    "malformed",
)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._last_success = 0.0
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
        # Prepared once: labels() costs a lock and a dictionary look-up on every webhook.
        self.webhooks_received = {
            outcome: self.webhooks.labels(outcome, "") for outcome in RECEIVED_OUTCOMES
        }
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
        self.last_successful_sync = Gauge(
            "connector_last_successful_sync_timestamp_seconds",
            "When the last outbound pass without a credentials error finished (Unix time; "
            "passes of every instance and of `connector sync`, as recorded in sync_runs)",
            registry=self.registry,
        )
        self.track_request_seconds = Histogram(
            "connector_customerio_request_duration_seconds",
            "Time of each Track API request, answered or not, by operation",
            ["operation"],
            buckets=REQUEST_BUCKETS,
            registry=self.registry,
        )
        self.webhook_lag_seconds = Histogram(
            "connector_webhook_processing_lag_seconds",
            "From a webhook's arrival to its tracked event being stored",
            buckets=LAG_BUCKETS,
            registry=self.registry,
        )
        self.status = Gauge(
            "connector_status",
            "What GET /status says: 0 ok, 1 warning, 2 error",
            registry=self.registry,
        )

    def webhook_outcome(self, outcome: str, event_label: str = "", count: int = 1) -> None:
        """Count ``count`` webhooks with ``outcome``. ``event_label`` must come from a bounded
        set (:func:`connector.inbound.mapping.webhook_event_label`): every distinct value is a
        time series kept in memory until the process ends."""
        self.webhooks.labels(outcome, event_label).inc(count)

    def pass_finished(self, finished_at: float, credentials_error: bool) -> None:
        """Note an outbound pass that finished at ``finished_at`` (Unix time)."""
        if not credentials_error and finished_at > self._last_success:
            self._last_success = finished_at
            self.last_successful_sync.set(finished_at)

    def render(self) -> bytes:
        return generate_latest(self.registry)
