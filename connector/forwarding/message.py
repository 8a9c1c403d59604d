"""A tracked Customer.io event as a Segment-spec ``track`` call (pure)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

INTEGRATION = {"name": "customerio"}


def segment_track(
    *,
    event_id: str,
    name: str,
    properties: dict[str, Any],
    occurred_at: datetime,
    customer_id: str | None,
    email: str | None,
    prefix: str = "",
) -> dict[str, Any]:
    """``userId`` is the customer id, else ``anonymousId`` the email; ``messageId`` is
    Customer.io's ``event_id`` so the destination can deduplicate retries."""
    call: dict[str, Any] = {
        "type": "track",
        "event": f"{prefix}{name}",
        "properties": properties,
        "timestamp": occurred_at.isoformat().replace("+00:00", "Z"),
        "messageId": event_id,
        "context": {"integration": INTEGRATION},
    }
    if customer_id:
        call["userId"] = customer_id
    elif email:
        call["anonymousId"] = email
    if email:
        call["context"]["traits"] = {"email": email}
    return call
