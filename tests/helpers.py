"""Small builders shared by the service tests."""

from __future__ import annotations

from typing import Any


def message(
    user_id: str = "u1",
    *,
    external_id: str | None = "ext-1",
    email: str | None = "ana@example.com",
    segments: tuple[str, ...] = ("seg-paying",),
    events: list[dict[str, Any]] | None = None,
    **attributes: Any,
) -> dict[str, Any]:
    """One notification message for a user in the given segments."""
    user: dict[str, Any] = {"id": user_id, "created_at": "2018-03-30T14:38:02Z", **attributes}
    if external_id is not None:
        user["external_id"] = external_id
    if email is not None:
        user["email"] = email
    return {
        "user": user,
        "segments": [{"id": s, "name": s.replace("seg-", "").title()} for s in segments],
        "events": events or [],
    }


def event(
    event_id: str, name: str, created_at: str = "2018-03-30 14:38:02 UTC", **kwargs: Any
) -> dict[str, Any]:
    return {
        "event_id": event_id,
        "event": name,
        "created_at": created_at,
        "properties": kwargs.get("properties", {}),
        "context": kwargs.get("context", {}),
    }


def notification(*messages: dict[str, Any]) -> dict[str, Any]:
    return {"notification_id": "n-test", "channel": "user:update", "messages": list(messages)}


def webhook(
    event_id: str,
    *,
    customer_id: str | None = None,
    email: str | None = None,
    cio_id: str | None = None,
    object_type: str = "email",
    metric: str = "opened",
) -> dict[str, Any]:
    """A Customer.io reporting webhook with these identifiers."""
    identifiers = {
        key: value
        for key, value in (("id", customer_id), ("email", email), ("cio_id", cio_id))
        if value is not None
    }
    return {
        "event_id": event_id,
        "object_type": object_type,
        "metric": metric,
        "timestamp": 1613063089,
        "data": {"identifiers": identifiers, "subject": "Hi"},
    }
